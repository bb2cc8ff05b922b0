"""``attnbench reproduce NAME``: run the suites a paper's table needs, then print the paper's figures,
the measured ones, and both as ratios to the paper's reference row, with the rank orders compared.

On a GPU each suite runs as written (the paper's batch, all models). On a CPU the suites are cut to
what this machine can run in minutes (:attr:`Target.cpu`: a smaller batch, the smallest model), and
the output says so. Runs go to ``results/reproduce/<name>-<device>/<suite>``; an existing run folder
there is resumed (cells already measured are kept), so a second call only draws the tables.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .analysis import reproduce as tables_mod
from .errors import AttnbenchError

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"


@dataclass(frozen=True)
class Target:
    """A paper's table: the suites it needs, how to cut them on a CPU, and how to draw the table."""

    suites: tuple[str, ...]
    tables: Callable[[list[dict[str, Any]]], list[tables_mod.Table]]
    cpu: dict[str, dict[str, Any]] = field(default_factory=dict)  # suite file -> keys replaced on a CPU
    cpu_note: str = ""


SWIN_T = [{"model": "swin_tiny_patch4_window7_224", "attention": "timm"}]
TARGETS: dict[str, Target] = {
    "swin-table5": Target(
        ("swin_table5.yaml", "swin_table5_models.yaml"), tables_mod.swin_table5,
        cpu={"swin_table5.yaml": {"batch": 8, "timing": {"warmup_s": 0.1, "target_s": 0.3, "min_repeats": 5,
                                                           "max_repeats": 30},
                                  "budget": {"cell_time_s": 20, "memory_fraction": 0.6}},
             "swin_table5_models.yaml": {"batch": 1, "models_only": "swin_tiny_patch4_window7_224",
                                         "timing": {"warmup_s": 0.1, "target_s": 0.5, "min_repeats": 3,
                                                    "max_repeats": 10},
                                         "budget": {"cell_time_s": 40, "memory_fraction": 0.6}}},
        cpu_note="on a CPU: stages at batch 8, whole models at batch 1 and Swin-T only (the paper: one V100, "
                 "batch 64, Swin-T/S/B)"),
    "swin-table8": Target(
        ("swin_table8.yaml",), tables_mod.swin_table8,
        cpu={"swin_table8.yaml": {"batch": 1, "models_only": "swin_tiny_patch4_window7_224",
                                  "timing": {"warmup_s": 0.1, "target_s": 0.5, "min_repeats": 3, "max_repeats": 10},
                                  "budget": {"cell_time_s": 40, "memory_fraction": 0.6}}},
        cpu_note="on a CPU: batch 1 and Swin-T only (the paper: one V100, batch 64, Swin-T/S/B)"),
    "mvitv2-attention": Target(
        ("mvitv2_attention.yaml",), tables_mod.mvitv2_attention,
        cpu={"mvitv2_attention.yaml": {"batch": 1, "timing": {"warmup_s": 0.1, "target_s": 0.5, "min_repeats": 3,
                                                                "max_repeats": 10}}},
        cpu_note="on a CPU: batch 1 (memory: the resident set's growth, coarse; on a GPU: the allocator's peak)"),
    "nat-speed": Target(
        ("local_vs_window.yaml",), tables_mod.nat_speed,
        cpu={"local_vs_window.yaml": {"batch": 1, "resolution": [28, 112, 224]}},
        cpu_note="on a CPU: batch 1, 7x7 to 56x56 tokens (NATTEN's figures: GPU)"),
    "slide-speed": Target(
        ("local_attention.yaml",), tables_mod.slide_speed,
        cpu={"local_attention.yaml": {"resolution": [224, 384]}},
        cpu_note="on a CPU: 224 and 384 px (the paper's figure: whole models on an iPhone 12)"),
}


class ReproduceError(AttnbenchError):
    """An unknown table name, or a suite file the table needs that is missing."""


def target(name: str) -> Target:
    if name not in TARGETS:
        raise ReproduceError(f"unknown table {name!r}; attnbench reproduces: {', '.join(sorted(TARGETS))}")
    return TARGETS[name]


def suite_data(target_: Target, file: str, device_type: str) -> dict[str, Any]:
    """The suite file's data, cut for a CPU where the target says how."""
    path = SUITES_DIR / file
    if not path.is_file():
        raise ReproduceError(f"{path}: the suite this table needs is missing (run from a clone of attnbench)")
    data = yaml.safe_load(path.read_text())
    if device_type == "cpu":
        cut = dict(target_.cpu.get(file, {}))
        only = cut.pop("models_only", None)
        data.update(cut)
        if only is not None:
            data["models"] = [m for m in data.get("models", []) if m.get("model") == only]
    return data


def reproduce(name: str, device: str = "auto", results_root: Path = Path("results"),
              progress: bool = False, on_note: Callable[[str], None] = print) -> list[tables_mod.Table]:
    """Run (or resume) the target's suites and return its tables; notes go to ``on_note``."""
    from .device import resolve_device
    from .runner import run_suite
    from .suite import parse_suite

    target_ = target(name)
    dev = resolve_device(device)
    if dev.type == "cpu" and target_.cpu_note:
        on_note(f"{name}: {target_.cpu_note}")
    rows: list[dict[str, Any]] = []
    for file in target_.suites:
        data = suite_data(target_, file, dev.type)
        suite = parse_suite(data, SUITES_DIR / file)
        out = Path(results_root) / "reproduce" / f"{name}-{dev.type}" / suite.name
        resume = (out / "rows.jsonl").is_file()
        on_note(f"{name}: {'resuming' if resume else 'running'} {file} -> {out}")
        result = run_suite(suite, out, device=str(dev), resume=resume, progress=progress, on_note=on_note)
        rows += result.rows
    return target_.tables(rows)


def write_tables(tables: list[tables_mod.Table], folder: Path) -> Path:
    """``table.md`` (every table, with tau and notes) and one PNG per table into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    md = folder / "table.md"
    md.write_text("\n".join(tables_mod.to_markdown(t) + "\n" + tables_mod.ratio_grid(t) for t in tables))
    for t in tables:
        tables_mod.plot_table(t, folder / f"{t.name}.png")
    return md
