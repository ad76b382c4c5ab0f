"""Models from torchvision and timm by name (`torchvision:resnet50`, `timm:convnext_tiny`), their blocks by
module name, their own input size and normalisation, and weights from local files.

    build_model("torchvision:resnet18", num_classes=10, in_channels=3, blocks=["layer2", "layer3", "layer4"])

`External` keeps the zoo's contract (pipeline.models): `forward(x)` returns `(logits, [f_1, f_2, f_3])` for the
data-normalised view `x` every model of the pipeline receives. Inside, an input adapter turns `x` into what the
network was trained on: the data's normalisation undone and the network's applied (`mean`, `std`), a grey image
repeated to three channels for a torchvision network, and a bilinear resize to `input_size`. The crop box of
a view is in the stored image's pixels, so a 224-pixel teacher and a 160-pixel student resize the same region.

Blocks are module names, read through the libraries' own feature extraction: torchvision's
`create_feature_extractor` (any module of the FX graph: `layer3`, `features.8`) and timm's
`forward_intermediates` (the modules of `feature_info`: `stages.2`, `layer3`). Pairing: a model lists at
least three blocks and the last three are the ones cached and distilled, teacher block i paired with student
block i counted from the end (the zoo's models have exactly their last three stages).

Weights (`load_weights`): a torch state dict or a safetensors file; a `module.` (DDP) or `_orig_mod.`
(torch.compile) prefix and a `state_dict` / `model` wrapper entry are handled; keys that do not fit end in
one line naming them.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.config import UserError

LIBRARIES = ("torchvision", "timm")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # torchvision's classification references
NUM_BLOCKS = 3  # = pipeline.models.cifar.NUM_BLOCKS (imported there would be circular: models imports this)


def is_external(arch: str) -> bool:
    """`library:name` rather than a zoo name."""
    return ":" in arch


def split_arch(arch: str) -> tuple[str, str]:
    library, _, name = arch.partition(":")
    if library not in LIBRARIES or not name:
        raise UserError(f"architecture '{arch}': write torchvision:NAME or timm:NAME (e.g. torchvision:resnet50, "
                        f"timm:convnext_tiny), or a zoo name")
    return library, name


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm is not installed: pip install 'meal-distill[timm]' (or pip install timm), then "
                        "rerun") from None
    return timm


def network(arch: str, num_classes: int, in_channels: int) -> nn.Module:
    """The bare, randomly initialised classifier of `arch` (no pretrained download: weights come from files)."""
    library, name = split_arch(arch)
    if library == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models(torchvision.models):
            close = difflib.get_close_matches(name, torchvision.models.list_models(torchvision.models), 5)
            raise UserError(f"torchvision has no classification model '{name}'" +
                            (f"; did you mean {', '.join(close)}?" if close else ""))
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    timm = _timm()
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), 5)
        raise UserError(f"timm has no model '{name}'" + (f"; did you mean {', '.join(close)}?" if close else ""))
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)


def default_input(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the network expects when the params give none: timm's pretrained config, else ImageNet's."""
    library, name = split_arch(arch)
    if library == "timm":
        cfg = _timm().get_pretrained_cfg(name)
        if cfg is not None and cfg.mean is not None:
            return tuple(cfg.mean), tuple(cfg.std)
    return IMAGENET


def block_choices(net: nn.Module, library: str, nodes: Sequence[str]) -> list[str]:
    """The module names `blocks` may name, in forward order (for the error of a wrong one); `nodes`: the
    torchvision network's FX node names (unused for timm, whose names are its `feature_info` modules)."""
    if library == "timm":
        return [f["module"] for f in net.feature_info]
    modules = [name for name, _ in net.named_modules() if name and name.count(".") <= 1]
    return [m for m in modules if any(n == m or n.startswith(m + ".") for n in nodes)]


def graph_nodes(net: nn.Module) -> tuple[list[str], list[str]]:
    """(train, eval) FX node names of a torchvision network: the names its blocks may take."""
    from torchvision.models.feature_extraction import get_graph_node_names

    return get_graph_node_names(net, tracer_kwargs=TRACER)


class External(nn.Module):
    """A torchvision or timm classifier behind the input adapter, returning (logits, [last three blocks])."""

    def __init__(self, arch: str, num_classes: int, in_channels: int, blocks: Sequence[str] = (),
                 input_size: int = 0, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 data_mean: Sequence[float] | None = None, data_std: Sequence[float] | None = None,
                 dropout: float = 0.0):
        super().__init__()
        self.library, _ = split_arch(arch)
        if len(blocks) < NUM_BLOCKS:
            raise UserError(f"{arch}: model.blocks = {list(blocks)} must name at least {NUM_BLOCKS} modules (the last "
                            f"{NUM_BLOCKS} are cached and distilled, paired from the end with the other model's)")
        net = network(arch, num_classes, in_channels)
        self.blocks, self.input_size = list(blocks), int(input_size)
        # the network as built, before any noise is wrapped in: the names the blocks must be among
        train_nodes, eval_nodes = graph_nodes(net) if self.library == "torchvision" else ([], [])
        known = ([f["module"] for f in net.feature_info] if self.library == "timm" else
                 [b for b in self.blocks if any(n == b or n.startswith(b + ".") for n in eval_nodes)])
        unknown = [b for b in self.blocks if b not in known]
        if unknown:
            what = "feature module" if self.library == "timm" else "module"
            raise UserError(f"{arch} has no {what} {unknown[0]!r}; blocks may be: "
                            f"{', '.join(block_choices(net, self.library, eval_nodes))}")
        if dropout > 0:  # ANC's noise z on the last block's output, which the classifier then reads too
            _wrap(net, self.blocks[-1], Noise(dropout), arch)
        mean, std = (mean, std) if mean is not None and std is not None else default_input(arch)
        channels = 3 if self.library == "torchvision" else in_channels
        if self.library == "torchvision" and in_channels not in (1, 3):
            raise UserError(f"{arch} takes 3-channel images, the data has {in_channels} channels")
        self.grey_to_rgb = self.library == "torchvision" and in_channels == 1
        data_mean = torch.tensor(data_mean if data_mean is not None else mean, dtype=torch.float32)
        data_std = torch.tensor(data_std if data_std is not None else std, dtype=torch.float32)
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        if len(mean_t) != channels or len(std_t) != channels:
            raise UserError(f"{arch}: model.mean and model.std need {channels} values, one per input channel")
        # x_net = (x * data_std + data_mean - mean) / std: one affine per channel on the data-normalised view
        self.register_buffer("scale", (data_std / std_t).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((data_mean - mean_t) / std_t).view(1, -1, 1, 1), persistent=False)
        if self.library == "timm":
            self.indices = [known.index(b) for b in self.blocks[-NUM_BLOCKS:]]
            self.net = net
        else:
            self.net = _extractor(net, self.blocks[-NUM_BLOCKS:], train_nodes[-1], eval_nodes[-1])

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """The data-normalised view (B, C, H, W) as the network's input (B, C', S, S)."""
        if self.grey_to_rgb:
            x = x.expand(-1, 3, -1, -1)
        x = x * self.scale + self.shift
        if self.input_size and x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-1] > self.input_size)
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.adapt(x)
        if self.library == "timm":
            final, feats = self.net.forward_intermediates(x, indices=self.indices)
            return self.net.forward_head(final), list(feats)  # (B, classes), [(B, C_i, H_i, W_i)] x 3
        out = self.net(x)  # {"logits": (B, classes), "block0": ..., ...}
        return out["logits"], [out[f"block{i}"] for i in range(NUM_BLOCKS)]


class Noise(nn.Module):
    """Dropout of whole channels of a (B, C, H, W) block output, of units of a (B, D) one."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(x, self.p, self.training) if x.dim() == 4 else F.dropout(x, self.p, self.training)


TRACER = {"leaf_modules": [Noise]}  # FX keeps the noise whole (its branch on the input's rank is not traceable)


def _wrap(net: nn.Module, name: str, after: nn.Module, arch: str) -> None:
    """Replace the module `name` of `net` by Sequential(it, after): its output, as the rest of the network and
    the block extraction see it, is then `after`'s (a student's keys under it gain a `.0`)."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = net.get_submodule(parent_name) if parent_name else net
        module = getattr(parent, child)
    except AttributeError:  # an FX node of a function (`flatten`), not a module
        raise UserError(f"{arch}: the last block {name!r} is not a module, so ANC's noise cannot follow it: name a "
                        f"module as the last block") from None
    setattr(parent, child, nn.Sequential(module, after))


def _extractor(net: nn.Module, blocks: list[str], train_out: str, eval_out: str) -> nn.Module:
    """torchvision's feature extractor returning the named blocks' outputs and the classifier's (the graph's last
    node in train and in eval mode: `train_out`, `eval_out`)."""
    from torchvision.models.feature_extraction import create_feature_extractor

    nodes = {b: f"block{i}" for i, b in enumerate(blocks)}
    return create_feature_extractor(net, train_return_nodes={**nodes, train_out: "logits"},
                                    eval_return_nodes={**nodes, eval_out: "logits"}, tracer_kwargs=TRACER)


# ---------------------------------------------------------------- weights from files


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (torch or safetensors), unwrapped and without DDP / compile prefixes."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {path} not found: give the path of a torch state dict or a safetensors file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:120]
        raise UserError(f"weights file {path} could not be read ({type(exc).__name__}: {first}): give a torch "
                        f"state dict (torch.save(model.state_dict(), ...)) or a safetensors file") from None
    for key in ("state_dict", "model", "model_state_dict"):  # a training checkpoint's usual wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"weights file {path} holds no state dict (a dict of tensors, or one under 'state_dict' / "
                        f"'model')")
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, arch: str) -> None:
    """`path`'s weights into the network of `model` (External) or into `model` itself (a zoo model); a key
    missing, unexpected or of another shape ends in one line naming them."""
    target = model.net if isinstance(model, External) else model
    state = read_state_dict(path)
    own = target.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", shapes)):
            if keys:
                shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                detail = "" if label != "mis-shaped" else \
                    f" ({keys[0]}: file {tuple(state[keys[0]].shape)}, model {tuple(own[keys[0]].shape)})"
                parts.append(f"{label} keys ({len(keys)}): {shown}{detail}")
        raise UserError(f"weights file {path} does not fit {arch}: {'; '.join(parts)}: check the architecture, "
                        f"num_classes and the model's arguments")
    target.load_state_dict(state)
