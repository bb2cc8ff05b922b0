"""Whole models: swapping an equivalent design into a timm backbone changes nothing (float64), whole-model
MACs match the papers, and model suites validate and run."""

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

import attnbench
from attnbench import models as M
from attnbench.errors import SuiteError
from attnbench.measure import flops as F
from attnbench.suite import parse_suite
from conftest import FAST_TIMING, randomize_
from equivalence import assert_close64

PAPERS = yaml.safe_load((Path(attnbench.__file__).parent / "data" / "papers.yaml").read_text())


def _swapped_pair(name, attention, img_size, seed=0):
    """timm's model with random weights (norms and biases too) in float64, and a copy with ``attention`` swapped in."""
    kind = M.model_kind(name)
    torch.manual_seed(seed)
    ref = randomize_(M.create_timm(name, img_size), seed=seed).eval()
    ours = copy.deepcopy(ref)
    swap = M.swap_attention(ours, kind, M.parse_attention(kind, attention, "test", "attention"))
    return ref.double(), ours.double().eval(), swap


def _same_output(ref, ours, img_size, batch=1):
    x = torch.randn(batch, 3, img_size, img_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close64(ours(x), ref(x))


@pytest.mark.parametrize("attention", [{"window": "swin.window", "shifted": "swin.shift_cyclic"},
                                       {"window": "swin.window", "shifted": "swin.shift_pad"}],
                         ids=["cyclic", "pad"])
def test_swin_t_with_swin_designs_is_timms_swin_t(attention):
    ref, ours, swap = _swapped_pair("swin_tiny_patch4_window7_224", attention, 224)
    assert swap.swapped == 12 and swap.weights_loaded == 12 and not swap.kept
    assert any(type(m).__module__ == "attnbench.impls.swin" for m in ours.modules())
    _same_output(ref, ours, 224)


@pytest.mark.parametrize("name,attention,size,swapped", [("pvt_v2_b0", "sra.conv", 96, 8),
                                                         ("mvitv2_tiny", "mvit.pool", 96, 7),
                                                         ("vit_small_patch16_224", "mha.math", 64, 12)])
def test_equivalent_designs_change_nothing(name, attention, size, swapped):
    """PVTv2 with sra.conv, MViTv2 with mvit.pool (blocks that change channels keep timm's: 3 of 10),
    ViT with mha (class token included, as a 1 x N sequence)."""
    ref, ours, swap = _swapped_pair(name, attention, size)
    assert swap.swapped == swapped == swap.weights_loaded
    _same_output(ref, ours, size)


def test_a_different_design_changes_the_output():
    """The comparison above can fail: Swin-T with windows in every block (no shift) is another model."""
    ref, ours, _ = _swapped_pair("swin_tiny_patch4_window7_224", "swin.window", 224)
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="differ in float64"):
            assert_close64(ours(x), ref(x))


def test_grid_designs_are_refused_where_a_class_token_has_no_place():
    ref = M.create_timm("vit_small_patch16_224", 64)
    with pytest.raises(ValueError, match="class token"):
        M.swap_attention(ref, "vit", M.parse_attention("vit", "swin.window", "t", "a"))


def test_hwin_pattern_puts_global_attention_in_the_last_block_of_the_last_three_stages():
    model = M.create_timm("mvitv2_tiny", 96)
    roles = {s.path: s.role for s in M.SLOTS["mvitv2"](model)}
    assert [p for p, r in roles.items() if r == "global"] == ["stages.1.blocks.1", "stages.2.blocks.4",
                                                              "stages.3.blocks.1"]


@pytest.mark.parametrize("name", sorted(PAPERS["model_macs"]["figures"]))
def test_whole_model_macs_match_the_papers(name):
    """fvcore's MACs of timm's model at 224 px, counted on the meta device, against the paper's figure:
    within 1%, or within the paper's rounding (half a unit of its last printed digit, 0.05 G)."""
    if name not in __import__("timm").list_models():
        pytest.skip(f"timm has no {name}")
    paper = PAPERS["model_macs"]["figures"][name] * 1e9
    counted = F.count_flops(lambda: M.build_model(name, 224, {})[0], (1, 3, 224, 224), torch.float32)
    macs = counted["macs_fvcore"]
    assert counted["fvcore_message"] == ""
    assert abs(macs - paper) <= max(0.01 * paper, 0.05e9), (name, macs / 1e9, paper / 1e9)


# --- suites ---------------------------------------------------------------------------------------

def _model_suite(models, **over):
    return {"name": "m", "device": "cpu", "resolution": [64], "models": models, "timing": dict(FAST_TIMING),
            "measure_peaks": False, **over}


def test_model_suite_cases():
    suite = parse_suite(_model_suite([{"model": "pvt_v2_b0", "attention": "sra.conv"},
                                      {"model": "swin_tiny_patch4_window7_224",
                                       "attention": {"window": "swin.window", "shifted": "swin.shift_pad"}}],
                                     resolution=[64, 96]))
    cases = suite.cases("cpu", ["float32"])
    assert [(c.model, c.impl, c.resolution) for c in cases] == [
        ("pvt_v2_b0", "sra.conv", 64), ("pvt_v2_b0", "sra.conv", 96),
        ("swin_tiny_patch4_window7_224", "shifted=swin.shift_pad,window=swin.window", 64),
        ("swin_tiny_patch4_window7_224", "shifted=swin.shift_pad,window=swin.window", 96)]
    assert cases[0].family == "model" and cases[0].patch == 4 and cases[0].grid_h == 16
    assert json.loads(cases[2].attention) == {"shifted": ["swin.shift_pad", {}], "window": ["swin.window", {}]}
    assert len({c.cell_id for c in cases}) == 4


@pytest.mark.parametrize("entry,key,match", [
    ({"model": "swin_tinny_patch4_window7_224"}, "models[0].model", "did you mean swin_tiny_patch4_window7_224"),
    ({"model": "vit_small_patch16_224", "attention": "swin.window"}, "models[0]", "class token"),
    ({"model": "pvt_v2_b0", "attention": "sra.convv"}, "models[0].attention", "unknown implementation"),
    ({"model": "swin_tiny_patch4_window7_224", "attention": {"window": "swin.window", "global": "mha.sdpa"}},
     "models[0].attention", "roles of a swin model are window, shifted"),
    ({"model": "pvt_v2_b0", "attention": {"sra.conv": {"sr_ratio": "x"}}}, "models[0].attention", ""),
    ({"model": "pvt_v2_b0", "attn": "sra.conv"}, "models[0]", "expected {model: NAME"),
])
def test_bad_model_entries_name_the_key(entry, key, match):
    with pytest.raises(SuiteError) as err:
        parse_suite(_model_suite([entry]))
    assert f"{key}:" in str(err.value) and match in str(err.value)


def test_a_model_cell_runs_and_records_what_it_swapped(tmp_path):
    from attnbench.runner import run_suite

    suite = parse_suite(_model_suite([{"model": "pvt_v2_b0", "attention": "sra.linear"},
                                      {"model": "pvt_v2_b0", "attention": "timm"}], resolution=[64]))
    rows = run_suite(suite, tmp_path / "run", progress=False).rows
    assert [r["status"] for r in rows] == ["ok", "ok"], [r.get("message") for r in rows]
    swapped, timm_row = rows
    assert swapped["model"] == "pvt_v2_b0" and swapped["impl"] == "sra.linear"
    assert swapped["model_blocks"].startswith("8/8 attention blocks swapped")
    assert timm_row["model_blocks"] == "timm's attention in all 8 blocks"
    assert swapped["macs_fvcore"] > 0 and swapped["throughput_img_s"] > 0 and swapped["latency_ms_median"] > 0
    assert swapped["macs_fvcore"] != timm_row["macs_fvcore"]  # linear SRA pools to 7x7: another cost
