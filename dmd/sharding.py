"""Fully sharded data parallel (PyTorch FSDP2) for DMD's trained networks.

``trainer=fsdp`` (GPUs) / ``trainer=fsdp_cpu`` (two gloo processes, for tests) select
:class:`FullyShardedStrategy`, Lightning's ``ModelParallelStrategy`` with every process in one
data-parallel group. :meth:`dmd.student.StudentModule.configure_model` then calls
:func:`shard_networks`: each residual and transformer block of the generator and the fake score
is its own FSDP unit (its parameters are gathered just for its forward/backward and freed
after), then each network as a whole, then the GAN head. Every rank holds 1/world of each
trained weight, gradient and AdamW state, so a full SDXL fine-tune fits where DDP's replicas do
not (``experiments/results/memory_recipe.md``). The frozen real score is not sharded: rank 0
alone samples the teacher for evaluation references.

Weights leave the shards only through :func:`full_state_dict` (a collective), e.g. to release
the generator from rank 0 into an ordinary module made by :func:`meta_copy`.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dmd.callbacks.checkpoint import previous_save
from dmd.files import replace_folder

# diffusers' residual and transformer blocks: the units whose weights are gathered together.
UNIT_CLASSES = ("ResnetBlock2D", "BasicTransformerBlock", "JointTransformerBlock",  # UNets, SD3's MMDiT
                "FluxTransformerBlock", "FluxSingleTransformerBlock")  # Flux


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all processes (data parallel only: no tensor parallelism)."""

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" puts the processes of a node in a tensor-parallel group.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        """Shards are written into a sibling folder that then replaces the checkpoint, so a job
        killed while saving leaves the previous checkpoint whole (never new weights beside old
        counters)."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(path.name + ".tmp"), previous_save(path, sharded=True)
        if self.global_rank == 0:
            _remove(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()  # every rank's shard is written
        if self.global_rank == 0:
            replace_folder(tmp, path, old)
        self.barrier()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def blocks(network: nn.Module) -> list[nn.Module]:
    """A network's residual and transformer blocks, each worth an FSDP unit of its own (the
    rest, e.g. time embedding and convolutions in/out, forms the network's own unit)."""
    return [m for m in network.modules() if type(m).__name__ in UNIT_CLASSES]


def shard_networks(networks: list[nn.Module], mesh) -> None:
    """Apply ``fully_shard`` to each network's blocks, then to the network itself (networks
    without parameters, e.g. the analytic mixture, stay as they are)."""
    from torch.distributed.fsdp import fully_shard

    for network in networks:
        # A denoiser's network, not the denoiser: losses call ``network_output``, which runs the
        # network's own forward (FSDP gathers a unit's weights in its forward hooks).
        unet = getattr(network, "unet", network)
        if unet is None or not any(True for _ in unet.parameters()):
            continue
        for block in blocks(unet):
            fully_shard(block, mesh=mesh)
        # Roots reshard after forward too (FSDP2 keeps a root gathered until its backward, which
        # never comes for the no-grad evaluations DMD makes of both scores and the generator).
        fully_shard(unet, mesh=mesh, reshard_after_forward=True)


def is_sharded(module: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in module.parameters())


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole state on the CPU of rank 0 (empty elsewhere). Collective: every rank
    must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def meta_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters live on the meta device (no memory); its buffers
    are real copies. Fill it with :func:`materialize`."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in module.parameters()}
    return copy.deepcopy(module, memo)


def materialize(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """An ordinary CPU module: a copy of ``template`` (from :func:`meta_copy`) holding ``state``."""
    module = copy.deepcopy(template)
    buffers = {name: b.detach().cpu().clone() for name, b in module.named_buffers()}
    module.to_empty(device="cpu")
    for name, b in buffers.items():  # to_empty blanks buffers too; state holds persistent ones only
        module.get_buffer(name).copy_(b)
    module.load_state_dict(state, strict=True)
    return module


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (every rank gets it) of a sharded DTensor; others pass through."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_to_cpu(tensors: list[torch.Tensor], keep: bool) -> list[torch.Tensor]:
    """Whole CPU copies of (possibly sharded) tensors where ``keep`` (e.g. on rank 0), an empty
    list elsewhere. Collective for DTensors; one tensor is whole on the device at a time."""
    out = []
    for t in tensors:
        gathered = whole(t).detach()
        if keep:
            out.append(gathered.cpu())
        del gathered
    return out


def shard_like(tensors: list[torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Split whole tensors, which every rank holds, the way ``params`` are sharded (inverse of
    :func:`gather_to_cpu`; no communication: each rank keeps its own slice)."""
    return [distribute_tensor(t.to(p.device_mesh.device_type), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) else t.to(p.device) for t, p in zip(tensors, params)]
