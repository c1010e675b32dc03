"""TitansLM trains the same under DDP and FSDP2 as in one process (gloo on CPU, 2 processes).

Two processes each take half of every global batch and train the same model (same seed) for
a few AdamW steps, wrapped in ``DistributedDataParallel`` and then in FSDP2
(``torch.distributed.fsdp.fully_shard`` on every block and on the model); this process trains
it alone on the whole batches. The loss of every step (the mean of the two halves' losses) and
all parameters after the last step must match, relative error at most 1e-10: the model runs
in float64, so the only differences are the orders of the gradient sums (measured: ~1e-15).

The last step runs the wrapped model under ``torch.compile`` with aot_eager (dynamo and
AOTAutograd trace the forward and the backward, the ops included through their fake kernels and
registered autograd, as for inductor; the traced graphs then run eagerly), and the test checks
that the ops' forward and backward were inside the traced graphs. Inductor itself is left out of
CI: its C++ code generation costs minutes on a 2-core machine (the ops under inductor are covered
by the ops' own compile tests).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F

import titans_ext
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.aot_autograd import make_boxed_func

from launcher import run_distributed
from utils import assert_close

WORLD_SIZE = 2
STEPS = 3
BATCH, SEQ_LEN, VOCAB = 4, 16, 64
TOLERANCE = 1e-10
WRAPPERS = ["ddp", "fsdp2"]
OPS = ["titans_ext.linear_memory_fwd.default", "titans_ext.linear_memory_bwd.default"]


def _model():
    torch.manual_seed(0)
    model = titans_ext.TitansLM(vocab_size=VOCAB, dim=32, depth=2, block="mag", heads=2, window=8,
                                persistent_tokens=2, chunk_size=4)
    return model.double()


def _batches():
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ_LEN + 1), generator=generator) for _ in range(STEPS)]


def _train(model, forward, compiled_forward, rows):
    """AdamW steps on ``rows`` of each global batch; the last step runs ``compiled_forward``.
    Returns the losses ``[STEPS]``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step, tokens in enumerate(_batches()):
        tokens = tokens[rows]
        logits, _ = (compiled_forward if step == STEPS - 1 else forward)(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def _recording_aot_eager(traced):
    """aot_eager that adds the operators of every forward and backward graph it runs to ``traced``."""
    def record(graph_module, example_inputs):
        traced.update(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module.forward)
    return aot_autograd(fw_compiler=record, bw_compiler=record)


def _train_wrapped(wrapper, rank, world_size):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = _model()
    rows = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    if wrapper == "ddp":
        wrapped = DistributedDataParallel(model)
    else:
        mesh = init_device_mesh("cpu", (world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    traced = set()
    losses = _train(model, wrapped, torch.compile(wrapped, backend=_recording_aot_eager(traced)), rows)
    dist.all_reduce(losses)
    params = {name: (p.full_tensor() if wrapper == "fsdp2" else p).detach() for name, p in model.named_parameters()}
    return losses / world_size, params, traced


def _worker(rank, world_size):
    # The blocks return their streaming states, which hold views (the tokens since the last chunk
    # boundary); FSDP2 warns about in-place ops on returned views, and this loop makes none.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    return {wrapper: _train_wrapped(wrapper, rank, world_size) for wrapper in WRAPPERS}


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    return run_distributed(_worker, WORLD_SIZE, tmp_path_factory.mktemp("training"))


@pytest.fixture(scope="module")
def one_process():
    model = _model()
    losses = _train(model, model, model, slice(None))
    return losses, {name: p.detach() for name, p in model.named_parameters()}


@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_trains_as_one_process(distributed_runs, one_process, wrapper):
    ref_losses, ref_params = one_process
    for rank, run in enumerate(distributed_runs):
        losses, params, traced = run[wrapper]
        assert set(OPS) <= traced, f"rank {rank}: the compiled step did not trace {sorted(set(OPS) - traced)}"
        assert_close(f"losses (rank {rank})", ref_losses, losses, TOLERANCE)
        assert params.keys() == ref_params.keys()
        for name, ref in ref_params.items():
            assert_close(f"{name} (rank {rank})", ref, params[name], TOLERANCE)
