"""Whole models: timm backbones built with random weights, their attention swapped for a registered design.

A model cell measures a whole backbone (images (B, 3, R, R) -> logits (B, classes)); its ``attention``
names which registered implementation replaces timm's attention module in which blocks. Nothing is
downloaded (``pretrained=False``); nothing reaches a network.

Supported model kinds, by timm name prefix, and how the swap reaches each block's attention:

- ``swin``: timm's ``SwinTransformerBlock._attn`` (norm1's output, (B, H, W, C) -> (B, H, W, C), the
  block's shift, padding and window partition included) is replaced by the design, so the design
  owns the whole token mixing; timm's residual, norms and MLP stay. Roles: ``window`` (blocks timm
  builds without a shift) and ``shifted``. Read off each block: ``window``, ``shift``.
- ``pvt_v2``: ``Block.attn(x (B, N, C), feat_size)``; the adapter reshapes to (B, H, W, C). Role
  ``default``. Read off: ``sr_ratio`` (1 where timm has no reduction), ``pool_size`` 7.
- ``mvitv2``: ``MultiScaleBlock.attn(x (B, N, C), feat_size) -> (x', feat_size')``. Role ``default``, and
  ``global`` for the last block of each of the last three stages (MViTv2's Hwin puts global attention
  there). Read off: ``pool``, ``kernel``, ``stride_q``, ``stride_kv``, ``rel_pos``, ``residual_pooling``,
  ``rel_pos_size``. Blocks whose attention changes the channel count (the first block of stages 2-4,
  C -> 2C) keep timm's module: the attnbench contract is C -> C. The cell says how many were swapped.
- ``vit``: ``Block.attn(x (B, N, C))``, N = class token + grid. Global designs (``mha.*``,
  ``performer.*``) take the whole sequence, class token included, as a 1 x N grid (attention over all
  tokens does not depend on their layout). Designs that need the 2-D grid are refused where the model
  has a class token (there is no grid position for it); build the model without one
  (``kwargs: {class_token: false, global_pool: avg}``) to swap them in. Roles: ``window`` (even
  blocks) and ``shifted`` (odd blocks), and ``global`` for the last block of each quarter of the
  depth (blocks 2, 5, 8, 11 of 12: where ViTDet and MViTv2's Hwin keep global attention).

A block whose own role has no rule takes the rule of its fallback role (MViTv2's and ViT's ``global``
blocks: ``default``, or their ``window``/``shifted`` place), so ``{default: mvit.window}`` puts
windows everywhere and ``{default: mvit.window, global: mvit.pool}`` is Hwin.

Weights: where the design's state_dict has timm's keys and shapes (Swin's window attention, PVTv2's
SRA, MViTv2's pooling attention, ViT's MHA), timm's weights are loaded into it, so swapping in an
equivalent design changes nothing; otherwise the design keeps its own random initialisation.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import registry
from .errors import SuiteError

KINDS = ("swin", "pvt_v2", "mvitv2", "vit")
ROLES = {"swin": ("window", "shifted"), "pvt_v2": ("default",), "mvitv2": ("default", "global"),
         "vit": ("window", "shifted", "global")}
GLOBAL_FAMILIES = frozenset({"mha", "performer"})


def model_kind(name: str) -> str | None:
    """The kind of a timm model name (``swin_tiny_patch4_window7_224`` -> ``swin``), or None."""
    for kind in KINDS:
        if name.startswith(kind + "_") or name == kind:
            return kind
    return None


@dataclass(frozen=True)
class Slot:
    """One attention module of a model: where it is, its role, its shape and what timm built it with."""

    path: str  # the block's module path, e.g. layers.0.blocks.1
    role: str
    dim: int
    heads: int
    derived: dict[str, Any] = field(default_factory=dict)  # parameter -> value read off timm's module
    swappable: str = ""  # why it cannot be swapped ("" when it can)
    fallback: str = ""  # the role whose rule applies when ``role`` has none


# ------------------------------------------------------------------------------ adapters


def _swin_attn(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.attn(x)


_SWAPPED_CLASSES: dict[type, type] = {}


def _swap_swin_block(block: nn.Module, design: nn.Module) -> None:
    """Make ``block._attn`` the design: the block's class becomes a subclass whose ``_attn`` calls ``attn``."""
    cls = type(block)
    if cls not in _SWAPPED_CLASSES:
        _SWAPPED_CLASSES[cls] = type(f"Swapped{cls.__name__}", (cls,), {"_attn": _swin_attn})
    block.__class__ = _SWAPPED_CLASSES[cls]
    block.attn = design


class TokensAdapter(nn.Module):
    """Tokens (B, N, C) with their grid (H, W) -> the design on (B, H, W, C) -> tokens (B, N', C).

    ``returns_size``: also return the output grid [H', W'] (MViTv2's calling convention)."""

    def __init__(self, design: nn.Module, returns_size: bool = False):
        super().__init__()
        self.design, self.returns_size = design, returns_size

    def forward(self, x: torch.Tensor, feat_size):
        B, N, C = x.shape
        H, W = feat_size
        y = self.design(x.reshape(B, H, W, C))
        out = y.reshape(B, -1, C)
        return (out, [y.shape[1], y.shape[2]]) if self.returns_size else out


class GridAdapter(nn.Module):
    """ViT tokens (B, N, C) without a class token, N = H x W -> the design on (B, H, W, C) -> (B, N, C)."""

    def __init__(self, design: nn.Module, grid: tuple[int, int]):
        super().__init__()
        self.design, self.grid = design, (int(grid[0]), int(grid[1]))

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the swapped ViT attention takes no attention mask and is not causal")
        B, N, C = x.shape
        return self.design(x.reshape(B, *self.grid, C)).reshape(B, N, C)


class SequenceAdapter(nn.Module):
    """ViT tokens (B, N, C), class token included -> a global design on a 1 x N grid -> (B, N, C)."""

    def __init__(self, design: nn.Module):
        super().__init__()
        self.design = design

    def forward(self, x: torch.Tensor, attn_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the swapped ViT attention takes no attention mask and is not causal")
        return self.design(x.unsqueeze(1)).squeeze(1)


# ------------------------------------------------------------------------------ slots of each kind


def _swin_slots(model: nn.Module) -> list[Slot]:
    out = []
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            shift = int(block.shift_size[0]) if any(block.shift_size) else 0
            out.append(Slot(f"layers.{i}.blocks.{j}", "shifted" if shift else "window", block.attn.qkv.in_features,
                            block.attn.num_heads, {"window": int(block.window_size[0]), "shift": shift}))
    return out


def _pvt_slots(model: nn.Module) -> list[Slot]:
    out = []
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            sr = 1 if attn.sr is None or attn.pool is not None else int(attn.sr.kernel_size[0])
            out.append(Slot(f"stages.{i}.blocks.{j}", "default", attn.dim, attn.num_heads,
                            {"sr_ratio": sr, "pool_size": 7}))
    return out


def _mvit_slots(model: nn.Module) -> list[Slot]:
    out = []
    stages = list(model.stages)
    for i, stage in enumerate(stages):
        for j, block in enumerate(stage.blocks):
            attn = block.attn
            dim_in, dim_out = attn.qkv.in_features, attn.qkv.out_features // 3
            pool = attn.pool_q if attn.pool_q is not None else attn.pool_k
            kernel = int(pool.kernel_size[0]) if pool is not None else 1
            stride_q = int(attn.pool_q.stride[0]) if attn.pool_q is not None else 1
            stride_kv = int(attn.pool_k.stride[0]) if attn.pool_k is not None else 1
            rel_pos = attn.rel_pos_type == "spatial"
            side = (attn.rel_pos_h.shape[0] + 1) // 2 if rel_pos else 1
            derived = {"pool": attn.mode, "kernel": kernel, "stride_q": stride_q, "stride_kv": stride_kv,
                       "rel_pos": rel_pos, "residual_pooling": bool(attn.residual_pooling),
                       "rel_pos_size": side * min(stride_q, stride_kv)}
            role = "global" if j == len(stage.blocks) - 1 and i >= len(stages) - 3 else "default"
            why = "" if dim_in == dim_out else f"its attention maps {dim_in} to {dim_out} channels"
            out.append(Slot(f"stages.{i}.blocks.{j}", role, dim_in, attn.num_heads, derived, why,
                            "default" if role == "global" else ""))
    return out


def _vit_slots(model: nn.Module) -> list[Slot]:
    depth = len(model.blocks)
    quarter = max(depth // 4, 1)
    out = []
    for j, block in enumerate(model.blocks):
        place = "shifted" if j % 2 else "window"
        role, fallback = ("global", place) if (j + 1) % quarter == 0 else (place, "")
        out.append(Slot(f"blocks.{j}", role, block.attn.qkv.in_features, block.attn.num_heads,
                        fallback=fallback))
    return out


SLOTS: dict[str, Callable[[nn.Module], list[Slot]]] = {"swin": _swin_slots, "pvt_v2": _pvt_slots,
                                                         "mvitv2": _mvit_slots, "vit": _vit_slots}


# ------------------------------------------------------------------------------ building


@dataclass(frozen=True)
class AttentionRule:
    """Which design replaces timm's attention in blocks of one role, with the parameters set for it."""

    impl: str
    params: tuple[tuple[str, Any], ...] = ()


def parse_attention(kind: str, value: Any, where: str, key: str) -> dict[str, AttentionRule]:
    """A suite's ``attention`` value -> role -> rule. ``null``/``timm``: timm's own attention everywhere;
    a name (or ``{name: {params}}``): that design in every block; a mapping of roles to those: per role
    (roles left out keep timm's attention)."""
    if value is None or value == "timm":
        return {}

    def rule(item: Any, at: str) -> AttentionRule:
        if isinstance(item, str):
            name, params = item, {}
        elif isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item)), str):
            name, params = next(iter(item.items()))
            params = params or {}
        else:
            raise SuiteError(f"expected a design name or {{name: {{param: value}}}}, got {item!r}", where, at)
        try:
            registry.check_params(registry.get_spec(name), params)
        except Exception as exc:  # UnknownImplError, ParamError
            raise SuiteError(str(exc), where, at) from None
        return AttentionRule(name, tuple(sorted(params.items())))

    roles = ROLES[kind]
    if isinstance(value, dict) and set(value) <= set(roles) and value:
        return {role: rule(item, f"{key}.{role}") for role, item in value.items()}
    if isinstance(value, dict) and len(value) > 1:
        raise SuiteError(f"roles of a {kind} model are {', '.join(roles)}; got {', '.join(map(str, value))}",
                         where, key)
    one = rule(value, key)
    return {role: one for role in roles}


def rules_label(kind: str, rules: dict[str, AttentionRule]) -> str:
    """``timm`` | ``swin.window`` | ``window=swin.window,shifted=swin.shift_pad`` (parameters in brackets)."""
    def text(r: AttentionRule) -> str:
        return r.impl + ("(" + ",".join(f"{k}={v}" for k, v in r.params) + ")" if r.params else "")

    if not rules:
        return "timm"
    texts = {role: text(r) for role, r in rules.items()}
    if len(set(texts.values())) == 1 and len(texts) == len(ROLES[kind]):
        return next(iter(texts.values()))
    return ",".join(f"{role}={t}" for role, t in sorted(texts.items()))


def create_timm(name: str, img_size: int, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """timm's model with random weights (nothing downloaded), built for ``img_size`` where timm takes it;
    ``kwargs`` go to ``timm.create_model`` (``class_token: false``, say)."""
    import timm

    args: dict[str, Any] = {**(kwargs or {}), "pretrained": False}
    if model_kind(name) in ("swin", "vit", "mvitv2"):
        args["img_size"] = img_size
    return timm.create_model(name, **args)


@dataclass
class Swap:
    """What a swap did: blocks swapped, blocks that kept timm's attention and why, weights loaded."""

    swapped: int = 0
    kept: list[str] = field(default_factory=list)
    weights_loaded: int = 0

    def text(self, total: int) -> str:
        out = f"{self.swapped}/{total} attention blocks swapped, timm weights loaded in {self.weights_loaded}"
        return out + (f"; kept timm's: {'; '.join(self.kept)}" if self.kept else "")


def _design_for(slot: Slot, rule: AttentionRule, merge: bool) -> nn.Module:
    spec = registry.get_spec(rule.impl)
    params = {k: v for k, v in slot.derived.items() if k in spec.params}
    params.update(dict(rule.params))
    if slot.role == "window" and "shift" in params and "shift" not in dict(rule.params):
        params.pop("shift")  # an unshifted block: the design's own default (its sibling has no shift)
    design = spec.build(dim=slot.dim, heads=slot.heads, **params)
    if merge and spec.has("reparameterize"):
        design = design.reparameterize() or design
    return design


def swap_attention(model: nn.Module, kind: str, rules: dict[str, AttentionRule], merge: bool = False) -> Swap:
    """Replace timm's attention in every block whose role has a rule (``merge``: designs that
    re-parameterize are merged, as for inference; timm's weights are then not loaded). Raises ValueError where a design
    cannot take a block (a grid design in a ViT with a class token, a shifted design in an unshifted block)."""
    done = Swap()
    for slot in SLOTS[kind](model):
        rule = rules.get(slot.role) or rules.get(slot.fallback)
        if rule is None:
            continue
        if slot.swappable:
            done.kept.append(f"{slot.path} ({slot.swappable})")
            continue
        block = model.get_submodule(slot.path)
        global_design = registry.get_spec(rule.impl).family in GLOBAL_FAMILIES
        if kind == "vit" and getattr(model, "num_prefix_tokens", 0) and not global_design:
            raise ValueError(f"{rule.impl} needs the token grid, and {type(model).__name__} has a class token "
                             f"(only global designs, families {', '.join(sorted(GLOBAL_FAMILIES))}, swap in here)")
        try:
            design = _design_for(slot, rule, merge)
        except ValueError as exc:
            raise ValueError(f"{rule.impl} cannot replace the attention of {slot.path} "
                             f"(dim {slot.dim}, heads {slot.heads}, {slot.derived}): {exc}") from None
        try:
            design.load_state_dict(block.attn.state_dict(), strict=True)
            done.weights_loaded += 1
        except RuntimeError:
            pass  # another layout: the design keeps its own initialisation
        if kind == "swin":
            _swap_swin_block(block, design)
        elif kind == "vit":
            block.attn = SequenceAdapter(design) if global_design else GridAdapter(design, model.patch_embed.grid_size)
        else:
            block.attn = TokensAdapter(design, returns_size=kind == "mvitv2")
        done.swapped += 1
    return done


def build_model(name: str, img_size: int, rules: dict[str, AttentionRule], merge: bool = False,
                kwargs: dict[str, Any] | None = None) -> tuple[nn.Module, Swap, int]:
    """(model, what the swap did, the number of attention blocks) for one model cell; the model
    carries the swap's description in ``attnbench_swap`` (:func:`describe_swap`)."""
    kind = model_kind(name)
    if kind is None:
        raise ValueError(f"model {name!r}: attnbench swaps attention in timm models named {', '.join(KINDS)}_*")
    model = create_timm(name, img_size, kwargs)
    total = len(SLOTS[kind](model))
    swap = swap_attention(model, kind, rules, merge)
    model.attnbench_swap = swap.text(total) if rules else f"timm's attention in all {total} blocks"
    return model, swap, total


def describe_swap(model: nn.Module) -> str:
    """What :func:`build_model` swapped in ``model`` (empty for a model it did not build)."""
    return str(getattr(model, "attnbench_swap", ""))


def describe(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The stem stride (patch), first-stage channels and heads of a model, for a cell's identity columns."""
    with torch.device("meta"):
        model = create_timm(name, 224, kwargs)
    slots = SLOTS[model_kind(name) or "vit"](model)
    stride = model.patch_embed.proj.stride[0] if hasattr(model, "patch_embed") else 4
    return {"patch": int(stride), "dim": slots[0].dim, "heads": slots[0].heads, "blocks": len(slots),
            "roles": sorted({s.role for s in slots})}


def rules_json(rules: dict[str, AttentionRule]) -> str:
    """Rules as canonical JSON (a cell's ``attention`` column, read back by :func:`rules_from_json`)."""
    return json.dumps({role: [r.impl, dict(r.params)] for role, r in sorted(rules.items())}, sort_keys=True)


def rules_from_json(text: str) -> dict[str, AttentionRule]:
    return {role: AttentionRule(impl, tuple(sorted(params.items())))
            for role, (impl, params) in json.loads(text or "{}").items()}


def parse_entry(item: Any, resolutions: list[int], where: str, key: str) -> dict[str, Any]:
    """A suite's ``models`` entry ``{model: NAME, attention: ...}`` -> the fields of a model entry.

    The model is built on the meta device at each resolution with its attention swapped, so a name
    timm lacks, a design that cannot take a block, or a size the model cannot take is a SuiteError here."""
    if not isinstance(item, dict) or not isinstance(item.get("model"), str) or \
            set(item) - {"model", "attention", "kwargs"}:
        raise SuiteError(f"expected {{model: NAME, attention: DESIGN | {{ROLE: DESIGN}} | timm, kwargs: {{...}}}}, "
                         f"got {item!r}", where, key)
    kwargs = item.get("kwargs") or {}
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) and isinstance(v, (bool, int, float, str))
                                               for k, v in kwargs.items()):
        raise SuiteError(f"kwargs must map timm.create_model's argument names to plain values, got {kwargs!r}",
                         where, f"{key}.kwargs")
    import timm

    name = item["model"]
    kind = model_kind(name)
    if kind is None or name not in timm.list_models():
        known = [m for m in timm.list_models() if model_kind(m)]
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise SuiteError(f"{name!r} is not a timm model attnbench can swap attention in ({', '.join(KINDS)}_*)"
                         f"{hint}", where, f"{key}.model")
    rules = parse_attention(kind, item.get("attention"), where, f"{key}.attention")
    for res in resolutions:
        try:
            with torch.device("meta"):
                build_model(name, res, rules, kwargs=kwargs)
        except (ValueError, AssertionError, RuntimeError, TypeError) as exc:
            raise SuiteError(f"{name} at {res} px: {exc}", where, key) from None
    info = describe(name, kwargs)
    return {"model": name, "attention_label": rules_label(kind, rules), "attention_json": rules_json(rules),
            "patch": info["patch"], "dim": info["dim"], "heads": info["heads"],
            "kwargs_json": json.dumps(kwargs, sort_keys=True) if kwargs else ""}
