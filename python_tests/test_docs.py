"""The notes in docs/ and every citation of them in the project's files.

Code, docstrings, tests and the README cite the notes as ``docs/<name>.md §x``. These tests fail,
naming the file, the line and what to write instead, when

- a cited note does not exist in docs/ (a ``docs/<name>.md`` path, or a ``§`` after a bare
  ``<name>.md``);
- a cited section does not exist in its note: ``§x``, ``§x.y`` (and each number of a range
  ``§x.y-z``) must number one of the note's headings (``## x. Title``, ``### x.y Title``);
- a citation outside docs/ is bare (``kernels.md §6.1``: write ``docs/kernels.md §6.1``), or a
  ``§`` cites no note. A ``§`` cites the note whose name it follows, across at most closing
  quotes or brackets, an opening parenthesis and a line break into the same comment
  (``docs/miras.md`` §2, ``docs/mlp_dual_form.md (§3``), or continues a list of sections of that
  note (``docs/kernels.md §5.1, §6.1``, ``§1 (steps A-E), §2``: up to 40 characters and one
  line break apart, no period or semicolon between); inside a note, any other ``§`` refers to
  the note itself;
- a file mentions the notes' former home under ``shared/``;
- a note is missing from the index docs/README.md, or numbers two headings alike.

Files are those git tracks or would track (untracked but not ignored), this one excepted: it
spells out the forbidden forms.
"""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
THIS_FILE = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Former names of notes, for the messages: the design notes' README became design.md.
RENAMED = {"README.md": "design.md", "anchors.md": "peers.md", "style.md": "contributing.md"}

HEADING = re.compile(r"^#{1,6}[ \t]+§?(\d+(?:\.\d+)*)(?:[.\s]|$)")
# A file name ending in .md, with the folders written before it (none for a bare name). URLs
# never match: no part of one starts a name (each is preceded by a name character or a slash).
MD_NAME = re.compile(r"(?<![\w./$-])((?:[\w.$-]+/)*)([\w-]+\.md)\b")
SECTION = re.compile(r"§[ \t]?(\d+(?:\.\d+)*)(?:-(\d+))?")
# What may stand between a note's name and the first section it cites: closing quotes or
# brackets, an opening parenthesis, a line break continuing the same comment.
NAME_TO_SECTION = re.compile(r"[`'\"*\])]*[ \t]*(?:\n[ \t]*(?://+|#+|\*)?[ \t]*)?\(?")
# A line break into the same comment (or an indented continuation line).
LINE_BREAK = re.compile(r"\n[ \t]*(?://+|#+|\*)?[ \t]*")
FORMER_HOME = re.compile(r"\bshared/|\bshared[ _-]design\b", re.IGNORECASE)


def project_files():
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the project's file list comes from git")
    for path in sorted(set(listed.split("\0")) - {"", THIS_FILE}):
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary files, and files deleted but not yet staged
        yield path, text


def note_sections(text):
    """The section numbers of a note's headings (outside fenced code), in order, duplicates kept."""
    numbers, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            numbers.append(m.group(1))
    return numbers


def notes():
    return {p.name: set(note_sections(p.read_text(encoding="utf-8"))) for p in sorted(DOCS.glob("*.md"))}


def cited_numbers(match):
    """``§6.1.8-9`` -> ["6.1.8", "6.1.9"]; ``§2`` -> ["2"]."""
    number, last = match.group(1), match.group(2)
    if last is None:
        return [number]
    head, _, first = number.rpartition(".")
    prefix = head + "." if head else ""
    return [prefix + str(i) for i in range(int(first), int(last) + 1)] or [number]


def continues_list(gap):
    """Whether the text between two sections lets the second continue the first's list
    ("§5.1, §6.1", "§1 (steps A-E), §2 (gates)"): at most 40 characters and one line break, and
    no period, semicolon or other section between."""
    flat = LINE_BREAK.sub(" ", gap, count=1)
    return len(flat) <= 40 and not re.search(r"[§.;\n]", flat)


def line_of(text, pos):
    return text.count("\n", 0, pos) + 1


def section_owners(text, names):
    """Each ``§`` match of ``text`` with the name match (of ``names``) whose note it cites, or None."""
    owners, previous, previous_owner = [], None, None
    for section in SECTION.finditer(text):
        before = [m for m in names if m.end() <= section.start()]
        owner = None
        if before and NAME_TO_SECTION.fullmatch(text, before[-1].end(), section.start()):
            owner = before[-1]
        elif previous_owner is not None and continues_list(text[previous.end():section.start()]):
            owner = previous_owner
        owners.append((section, owner))
        previous, previous_owner = section, owner
    return owners


def citation_problems(path, text, known):
    """Problems with the notes and sections ``text`` (the file ``path``) cites, as messages."""
    problems = []
    in_docs = path.startswith("docs/") and path.count("/") == 1

    def check_sections(sections, note, whose=""):
        for section in sections:
            for number in cited_numbers(section):
                if number not in known[note]:
                    problems.append(f"{path}:{line_of(text, section.start())}: §{number}{whose} is not a heading "
                                    f"of docs/{note}; its sections: {sorted(known[note])}")

    names = list(MD_NAME.finditer(text))
    cited_by = {id(m): [] for m in names}  # name match -> the § matches that cite its note
    for section, owner in section_owners(text, names):
        if owner is not None:
            cited_by[id(owner)].append(section)
        elif in_docs:
            note = Path(path).name
            check_sections([section], note, f" (of {note} itself)")
        else:
            problems.append(f"{path}:{line_of(text, section.start())}: '{section.group(0)}' cites no note; write "
                            f"docs/<name>.md {section.group(0)} (a paper's sections: 'Sec.')")

    for m in names:
        folders, name = m.group(1), m.group(2)
        sections = cited_by[id(m)]
        where = f"{path}:{line_of(text, m.start())}"
        is_docs_path = folders.rstrip("/").rpartition("/")[2] == "docs"
        target = name if is_docs_path else RENAMED.get(name, name)
        cite = f"docs/{target}" + (f" {sections[0].group(0)}" if sections else "")
        if FORMER_HOME.search(folders):
            problems.append(f"{where}: {folders}{name} is the notes' former home: write {cite}")
        elif folders and not is_docs_path:
            problems += [f"{path}:{line_of(text, section.start())}: '{section.group(0)}' follows {folders}{name}, "
                         f"which is not a note; cite docs/<name>.md {section.group(0)}" for section in sections]
            continue
        elif not folders and not sections:
            # A bare name that cites no section: the project's README, or some other file.
            if name == "README.md" or (name not in known and name not in RENAMED):
                continue
        if not folders and not in_docs:
            problems.append(f"{where}: bare note name {name}: write {cite}")
        if target not in known:
            renamed = f" ({name} is now docs/{RENAMED[name]})" if name in RENAMED else ""
            problems.append(f"{where}: cites docs/{name}, which does not exist{renamed}; notes: {sorted(known)}")
        else:
            check_sections(sections, target)
    return problems


def test_every_cited_note_and_section_exists():
    known = notes()
    assert known, "docs/ holds no notes"
    problems = [p for path, text in project_files() for p in citation_problems(path, text, known)]
    assert not problems, "citations of docs/ to fix:\n" + "\n".join(problems)


def test_no_file_mentions_the_former_home_of_the_notes():
    problems = [f"{path}:{line_of(text, m.start())}: '{m.group(0)}': the notes live in docs/ now "
                "(cite docs/<name>.md §x; the design README is docs/design.md)"
                for path, text in project_files() for m in FORMER_HOME.finditer(text)]
    assert not problems, "\n".join(problems)


def test_notes_are_indexed_and_number_their_headings_once():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    problems = [f"docs/README.md does not list {name}" for name in notes() if name != "README.md" and name not in index]
    for path in sorted(DOCS.glob("*.md")):
        numbers = note_sections(path.read_text(encoding="utf-8"))
        twice = sorted({n for n in numbers if numbers.count(n) > 1})
        if twice:
            problems.append(f"docs/{path.name} numbers more than one heading {twice}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("text, expected", [
    ("see docs/design.md §2 and docs/kernels.md §5.1, §6.1.8-9.", []),
    ("(``docs/mlp_dual_form.md``\n    §3 forward, §4 backward)", []),
    ("// docs/backward_linear.md\n// §1 (steps A-E), §2 (gates)", []),
    ("see docs/design.md §9", ["§9 is not a heading of docs/design.md"]),
    ("see docs/nowhere.md", ["cites docs/nowhere.md, which does not exist"]),
    ("see docs/anchors.md §1", ["anchors.md is now docs/peers.md"]),
    ("see kernels.md §6.1", ["bare note name kernels.md: write docs/kernels.md §6.1"]),
    ("see README.md §2", ["bare note name README.md: write docs/design.md §2"]),
    ("see shared/design/README.md §2", ["shared/design/README.md is the notes' former home: write docs/design.md §2"]),
    ("the README.md example", []),
    ("writes bench/results/cpu.md", []),
    ("writes bench/results/cpu.md §2", ["follows bench/results/cpu.md, which is not a note"]),
    ("docs/design.md says so. §2 says more", ["'§2' cites no note"]),
    ("docs/design.md §1 (a long aside that runs on and on), and §2", ["'§2' cites no note"]),
    ("docs/design.md §1; see §2", ["'§2' cites no note"]),
    ("https://github.com/o/r/blob/main/README.md", []),
])
def test_citation_rules(text, expected):
    known = {"design.md": {"1", "2"}, "kernels.md": {"5.1", "6.1", "6.1.8", "6.1.9"},
             "mlp_dual_form.md": {"3", "4"}, "backward_linear.md": {"1", "2"}, "peers.md": {"1"}}
    problems = citation_problems("titans_ext/example.py", text, known)
    assert len(problems) == len(expected), problems
    for problem, fragment in zip(problems, expected):
        assert fragment in problem, problem


def test_sections_inside_a_note_refer_to_the_note_itself():
    known = {"design.md": {"1", "2"}, "kernels.md": {"5.1"}}
    assert citation_problems("docs/design.md", "as in §2; see kernels.md §5.1", known) == []
    assert citation_problems("docs/design.md", "see [kernels.md](kernels.md) for more; as in §2", known) == []
    assert "§3 (of design.md itself)" in citation_problems("docs/design.md", "as in §3", known)[0]
