#!/usr/bin/env bash
# Builds a titans_ext wheel and checks it as users meet it (docs/build.md §5, §6):
#   1. the wheel: a cp310-abi3 tag and a build stamp (titans_ext/_build_info.py);
#   2. its libraries: no libtorch_python, libpython or OpenMP runtime needed (readelf -d), no at:: or
#      c10:: symbol undefined (nm -D | c++filt): they link only LibTorch's stable C shim;
#   3. abi3audit (CPython's stable ABI) and torch-abi-audit (LibTorch's: STABLE, for a torch no newer
#      than the build's TORCH_TARGET), from a tool venv the script makes;
#   4. a CUDA wheel: cuobjdump lists the SASS of every arch of the build's CUDA_ARCHS, and the PTX of
#      each "+PTX" one;
#   5. for each TORCH given: a fresh venv with that torch and the wheel installed into it (not
#      editable), then, from an empty folder with no source tree on the path,
#      scripts/smoke_installed_wheel.py and `python -m titans_ext demo --steps 20 --batch-size 4`.
#
#   bash scripts/check_wheel.sh [--cuda] [--wheel FILE] [--keep] [TORCH ...]
#
# TORCH: a torch version from the package index (2.11.0, 2.14.1, ...) or a torch wheel file, installed
# with pip into the fresh venv together with the wheel's dependencies; or "build" (the default): the
# torch of the build python itself, nothing downloaded (offline): the venv is made with
# --system-site-packages for a system python, or, for a build python inside a venv, sees that venv's
# site-packages on its path.
#
#   --cuda        a CUDA wheel: TITANS_EXT_CUDA=1 and TITANS_EXT_CUDA_ARCHS=release (unless set).
#                 Without it a CPU wheel: TITANS_EXT_CUDA=0, even with a CUDA torch and nvcc.
#   --wheel FILE  check FILE instead of building a wheel.
#   --keep        keep the work folder (the wheel, the venvs, the demo's plots) and print its path.
#
# Environment: PYTHON, the build python (default .venv/bin/python if present, else python3);
# MAX_JOBS; CHECK_WHEEL_TOOLS, the tool venv, made if missing (default build/check_wheel_tools).
# Offline (a GPU machine), the tools install from a folder of their wheels made beforehand with
# `pip download -d DIR abi3audit torch-abi-audit nvidia-cuda-cuobjdump`:
# PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR bash scripts/check_wheel.sh --cuda build
#
# The wheel is built from a copy of the checkout's files (tracked and untracked, not ignored), so
# an in-place build's libraries and stamp cannot leak into it and its build folder is not shared.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

variant=cpu wheel="" keep=0 torches=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --cuda) variant=cuda ;;
    --wheel) wheel="$(realpath "$2")"; shift ;;
    --keep) keep=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "check_wheel: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) torches+=("$1") ;;
  esac
  shift
done
[[ ${#torches[@]} -gt 0 ]] || torches=(build)

if [[ -n "${PYTHON:-}" ]]; then PY="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"
else PY=python3
fi
TOOLS="${CHECK_WHEEL_TOOLS:-$ROOT/build/check_wheel_tools}"
work="$(mktemp -d "${TMPDIR:-/tmp}/check_wheel.XXXXXX")"
if [[ $keep == 1 ]]; then trap 'echo "check_wheel: work folder kept: $work"' EXIT; else trap 'rm -rf "$work"' EXIT; fi

failures=()
fail() { echo "FAIL: $*" >&2; failures+=("$*"); }
step() { echo; echo "== $* ($(date +%T))"; }
# pip's notes about the configured wheel folders that do not exist on this machine are noise.
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# --- 1. the wheel ---------------------------------------------------------------------------
if [[ -z "$wheel" ]]; then
  step "building the $variant wheel with $PY ($("$PY" -c 'import torch; print("torch", torch.__version__)'))"
  mkdir -p "$work/src" "$work/dist"
  if git -C "$ROOT" rev-parse --git-dir >/dev/null 2>&1; then
    (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
       | tar --null --files-from=- --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$work/src"
  else
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./dist --exclude='*.so' \
      --exclude='*.egg-info' --exclude=./titans_ext/_build_info.py -cf - . | tar -xf - -C "$work/src"
  fi
  if [[ $variant == cuda ]]; then
    build_env=(TITANS_EXT_CUDA=1 "TITANS_EXT_CUDA_ARCHS=${TITANS_EXT_CUDA_ARCHS:-release}")
  else
    build_env=(TITANS_EXT_CUDA=0)
  fi
  started=$SECONDS
  (cd "$work/src" && env "${build_env[@]}" "$PY" -m pip wheel . --no-build-isolation --no-deps -q \
     --disable-pip-version-check -w "$work/dist" > "$work/build.log" 2>&1) \
    || { grep -v "is ignored: it is neither" "$work/build.log" | tail -40 >&2; echo "FAIL: the wheel did not build" >&2; exit 1; }
  wheel="$(ls "$work"/dist/titans_ext-*.whl)"
  echo "built $(basename "$wheel") in $((SECONDS - started)) s"
fi

step "checking $(basename "$wheel")"
[[ "$(basename "$wheel")" == *-cp310-abi3-*.whl ]] || fail "the wheel is not tagged cp310-abi3"
"$PY" -m zipfile -e "$wheel" "$work/unpacked"
stamp="$work/unpacked/titans_ext/_build_info.py"
[[ -f "$stamp" ]] || { echo "FAIL: the wheel has no build stamp titans_ext/_build_info.py" >&2; exit 1; }
read_stamp() { "$PY" -c "import runpy, sys; print(runpy.run_path(sys.argv[1])[sys.argv[2]])" "$stamp" "$1"; }
target="$(read_stamp TORCH_TARGET)" cuda_archs="$(read_stamp CUDA_ARCHS)"
echo "build stamp: $(grep -v '^"""\|^$' "$stamp" | tr '\n' ' ')"
if [[ $variant == cuda && "$cuda_archs" == None ]]; then fail "a CUDA wheel was asked for, but the stamp says CPU-only"; fi
mapfile -t libraries < <(find "$work/unpacked" -name '*.so' | sort)
[[ ${#libraries[@]} -gt 0 ]] || fail "the wheel holds no compiled library"

# --- 2. what the libraries link ---------------------------------------------------------------
for lib in "${libraries[@]}"; do
  name="${lib#"$work/unpacked/"}"
  needed="$(readelf -d "$lib" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
  bad="$(grep -E '^lib(torch_python|python|gomp|omp|iomp)' <<<"$needed" || true)"
  [[ -z "$bad" ]] || fail "$name needs $(echo $bad)"
  unstable="$(nm -D --undefined-only "$lib" | c++filt | grep -E '\b(at|c10)::' || true)"
  [[ -z "$unstable" ]] || fail "$name imports ATen/c10 symbols: $(head -5 <<<"$unstable")"
  echo "$name: needs $(echo $needed); no at::/c10:: symbol imported: $([[ -z "$unstable" ]] && echo yes || echo NO)"
done

# --- 3. the abi3 and LibTorch stable-ABI audits -----------------------------------------------
tool_packages=(abi3audit torch-abi-audit)
[[ "$cuda_archs" == None ]] || tool_packages+=(nvidia-cuda-cuobjdump)
if ! "$TOOLS/bin/python" -c "import abi3audit, torch_abi_audit" 2>/dev/null \
   || { [[ "$cuda_archs" != None ]] && [[ -z "$(find "$TOOLS" -name cuobjdump -type f 2>/dev/null)" ]]; }; then
  step "making the tool venv $TOOLS (${tool_packages[*]})"
  "$PY" -m venv --clear "$TOOLS"
  quiet_pip "$TOOLS/bin/pip" install -q --disable-pip-version-check "${tool_packages[@]}"
fi
step "audits"
"$TOOLS/bin/abi3audit" --strict --summary "$wheel" || fail "abi3audit"
# --check torch: exit 1 on any use of libtorch outside the stable ABI; the JSON says which torch
# each library needs at least, which must not be newer than the build's target.
"$TOOLS/bin/torch-abi-audit" --check torch --json "$work/unpacked/titans_ext" > "$work/torch-abi-audit.json" \
  || fail "torch-abi-audit --check torch"
"$TOOLS/bin/python" - "$work/torch-abi-audit.json" "$target" <<'EOF' || fail "torch-abi-audit: not STABLE for torch $target"
import json, sys
report, target = json.load(open(sys.argv[1])), sys.argv[2]
def version(text): return tuple(int(part) for part in text.split(".")[:2])
ok = bool(report["extensions"])
for ext in report["extensions"]:
    torch = ext["torch"]
    stable = torch["uses_torch"] and torch["stable"] and not torch["unstable_symbols"]
    fits = torch["min_torch_version"] is not None and version(torch["min_torch_version"]) <= version(target)
    ok &= stable and fits and ext["cpython"]["compliant"]
    print(f"torch-abi-audit: {ext['path'].rsplit('/', 1)[-1]}: {'STABLE' if stable else 'NOT STABLE'}, "
          f"min torch {torch['min_torch_version']} (target {target}), {torch['stable_shim_count']} shim symbols, "
          f"unstable {torch['unstable_symbols'][:5]}, abi3 {'ok' if ext['cpython']['compliant'] else 'VIOLATED'}")
sys.exit(0 if ok else 1)
EOF

# --- 4. the CUDA images ---------------------------------------------------------------------------
if [[ "$cuda_archs" != None ]]; then
  cuobjdump="$(find "$TOOLS" -name cuobjdump -type f | head -1)"
  cuda_lib="$work/unpacked/titans_ext/_C.abi3.so"
  elf="$("$cuobjdump" --list-elf "$cuda_lib")" ptx="$("$cuobjdump" --list-ptx "$cuda_lib" || true)"
  IFS=';' read -ra archs <<<"$cuda_archs"
  for arch in "${archs[@]}"; do
    sm="sm_$(tr -d . <<<"${arch%+PTX}")"
    grep -q "\.$sm\.cubin" <<<"$elf" || fail "_C has no $sm image (arch $arch)"
    if [[ "$arch" == *+PTX ]]; then grep -q "\.$sm\.ptx" <<<"$ptx" || fail "_C has no PTX for $sm (arch $arch)"; fi
  done
  echo "cuobjdump: images $(grep -o 'sm_[0-9]*[af]\?\.cubin' <<<"$elf" | sed 's/\.cubin//' | sort -u | xargs),"\
       "PTX $(grep -o 'sm_[0-9]*[af]\?\.ptx' <<<"$ptx" | sed 's/\.ptx//' | sort -u | xargs) (archs $cuda_archs)"
fi

# --- 5. a fresh venv per torch, and the smoke test ---------------------------------------------------
smoke_one() {  # $1: a torch version, a torch wheel file or "build"; $2: the venv
  local torch_spec="$1" venv="$2" site
  if [[ "$torch_spec" == build ]]; then
    if "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
      "$PY" -m venv "$venv"
      # Installed before the build environment becomes visible, so pip sees no other titans_ext.
      quiet_pip "$venv/bin/pip" install -q --disable-pip-version-check --no-index --no-deps "$wheel"
      site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
      # Plain paths after the venv's own: their .pth files (an editable titans_ext) are not run.
      "$PY" -c 'import site; print("\n".join(site.getsitepackages()))' > "$site/build_environment.pth"
    else
      "$PY" -m venv --system-site-packages "$venv"
      quiet_pip "$venv/bin/pip" install -q --disable-pip-version-check --no-index --no-deps --force-reinstall "$wheel"
    fi
  else
    [[ -f "$torch_spec" ]] || torch_spec="torch==$torch_spec"
    "$PY" -m venv "$venv"
    quiet_pip "$venv/bin/pip" install -q --disable-pip-version-check "$torch_spec"
    quiet_pip "$venv/bin/pip" install -q --disable-pip-version-check "$wheel[demo]"
  fi
  echo "venv ready: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
  local run_dir="$venv.run" device=()
  [[ "$cuda_archs" != None ]] || device=(--device cpu)  # a CPU wheel on a GPU machine: CPU ops only
  mkdir -p "$run_dir" && cd "$run_dir"
  "$venv/bin/python" -I "$ROOT/scripts/smoke_installed_wheel.py"
  "$venv/bin/titans-ext" --help >/dev/null
  # A small batch: the demo runs end to end (training, evaluation, plot) in seconds; no progress bars.
  TQDM_DISABLE=1 "$venv/bin/python" -I -m titans_ext demo --steps 20 --batch-size 4 "${device[@]}" \
    --out "$run_dir/demo.png"
  [[ -s "$run_dir/demo.png" ]]
}

results=()
for torch_spec in "${torches[@]}"; do
  venv="$work/venv-$(basename "$torch_spec" | tr -c 'A-Za-z0-9.\n' _)"
  step "fresh venv with torch $torch_spec: install and smoke test"
  started=$SECONDS
  # Not in an if: bash ignores set -e inside a tested command, and every step must stop the check.
  set +e
  (set -e; smoke_one "$torch_spec" "$venv")
  status=$?
  set -e
  if [[ $status == 0 ]]; then
    results+=("torch $torch_spec: passed ($((SECONDS - started)) s)")
  else
    fail "torch $torch_spec: the install or the smoke test failed"
    results+=("torch $torch_spec: FAILED")
  fi
  [[ $keep == 1 ]] || rm -rf "$venv"  # a torch venv takes gigabytes
done

step "summary for $(basename "$wheel")"
printf '%s\n' "${results[@]}"
if [[ ${#failures[@]} -gt 0 ]]; then
  printf 'FAIL: %s\n' "${failures[@]}" >&2
  exit 1
fi
echo "check_wheel: all checks passed"
