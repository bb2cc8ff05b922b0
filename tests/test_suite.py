"""Suite validation: every problem is a SuiteError naming the file, the key path and what is allowed."""

import textwrap

import pytest

import attnbench
from attnbench.suite import load_suite, parse_suite

GOOD = {"name": "t", "dim": 32, "heads": 2, "resolution": [32, 64], "impls": ["mha.sdpa", {"sra.conv": {"sr_ratio": 2}}]}


def bad(**changes):
    d = {**GOOD, **changes}
    return {k: v for k, v in d.items() if v is not None}


def test_good_suite_grid():
    s = parse_suite(GOOD)
    cases = s.cases("cpu", ["float32"])
    assert len(cases) == 4
    assert [c.resolution for c in cases] == [32, 64, 32, 64]
    assert cases[0].grid_h == 8 and cases[0].tokens == 64
    assert cases[2].label == "sra.conv(sr_ratio=2)" and dict(cases[2].params) == {"sr_ratio": 2}
    assert len({c.cell_id for c in cases}) == 4


def test_lists_multiply():
    s = parse_suite(bad(mode=["forward", "train"], batch=[1, 2], impls=["mha.sdpa"]))
    assert len(s.cases("cpu", ["float32", "bfloat16"])) == 2 * 2 * 2 * 2


@pytest.mark.parametrize("data,key,text", [
    (bad(resolutoin=[32]), "resolutoin", "did you mean 'resolution'"),
    (bad(resolution="big"), "resolution[0]", "valid integer"),
    (bad(resolution=[32, -4]), "resolution[1]", "greater than 0"),
    (bad(dtype="float64"), "dtype[0]", "bfloat16"),
    (bad(mode="inference"), "mode[0]", "train"),
    (bad(device="tpu"), "device", "pattern"),
    (bad(dim="96"), "dim[0]", "valid integer"),
    (bad(impls=["mha.sdp"]), "impls[0]", "did you mean 'mha.sdpa'"),
    (bad(impls=[{"sra.conv": {"ratio": 2}}]), "impls[0].sra.conv", "parameters: sr_ratio=8"),
    (bad(impls=[{"sra.conv": {"sr_ratio": "2"}}]), "impls[0].sra.conv", "must be int"),
    (bad(impls=[{"sra.conv": {"sr_ratio": 0}}]), "impls[0]", "sr_ratio must be >= 1"),
    (bad(impls=[["mha.sdpa"]]), "impls[0]", "expected"),
    (bad(impls=[]), "impls", "at least one attention implementation (impls) or whole model (models)"),
    (bad(heads=5), "heads", "not divisible"),
    (bad(resolution=[30]), "resolution[0]", "multiple of patch"),
    (bad(timing={"warmup": 1}), "timing.warmup", "allowed here: warmup_s"),
    (bad(budget={"cell_time_s": 0}), "budget.cell_time_s", "greater than 0"),
    (bad(name=None), "name", "required"),
    (bad(plugins=["nowhere.py"]), "plugins[0]", "does not exist"),
])
def test_bad_suites(data, key, text):
    with pytest.raises(attnbench.SuiteError) as e:
        parse_suite(data)
    assert e.value.key == key or key in str(e.value), str(e.value)
    assert text in str(e.value), str(e.value)


def test_several_problems_reported_together():
    with pytest.raises(attnbench.SuiteError) as e:
        parse_suite(bad(dim="x", heads="y"))
    assert "dim[0]" in str(e.value) and "heads[0]" in str(e.value)


def test_yaml_errors_name_file_and_line(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: t\nresolution: [224, 320\nimpls: [mha.sdpa]\n")
    with pytest.raises(attnbench.SuiteError) as e:
        load_suite(p)
    assert str(p) in str(e.value) and "line" in str(e.value)
    with pytest.raises(attnbench.SuiteError, match="not found"):
        load_suite(tmp_path / "missing.yaml")
    p.write_text("- just\n- a list\n")
    with pytest.raises(attnbench.SuiteError, match="mapping"):
        load_suite(p)


def test_plugin_paths_relative_to_suite(tmp_path):
    (tmp_path / "p.py").write_text(textwrap.dedent('''
        import torch, attnbench
        @attnbench.register("rel.proj")
        class P(torch.nn.Module):
            """Relative plugin."""
            def __init__(self, dim, heads):
                super().__init__()
                self.l = torch.nn.Linear(dim, dim)
            def forward(self, x):
                return self.l(x)
    '''))
    (tmp_path / "s.yaml").write_text("name: s\ndim: 8\nheads: 1\nresolution: 32\nplugins: [p.py]\nimpls: [rel.proj]\n")
    s = load_suite(tmp_path / "s.yaml")
    assert s.entries[0].name == "rel.proj"


def test_shipped_suites_validate():
    from conftest import ROOT

    for path in sorted((ROOT / "suites").glob("*.yaml")):
        load_suite(path)


def test_shapes_pair_resolution_dim_heads():
    shapes = [{"name": "S1", "resolution": 224, "patch": 4, "dim": 96, "heads": 3},
              {"name": "S2", "resolution": 224, "patch": 8, "dim": 192, "heads": 6}]
    s = parse_suite({"name": "t", "shapes": shapes, "impls": ["mha.sdpa"]})
    cases = s.cases("cpu", ["float32"])
    assert [(c.shape, c.grid_h, c.dim, c.heads) for c in cases] == [("S1", 56, 96, 3), ("S2", 28, 192, 6)]
    assert cases[0].series != cases[1].series


@pytest.mark.parametrize("data,key,text", [
    ({"name": "t", "shapes": [{"resolution": 64, "dim": 32, "heads": 2}], "dim": 32, "impls": ["mha.sdpa"]},
     "shapes", "not both"),
    ({"name": "t", "resolution": 64, "heads": 2, "impls": ["mha.sdpa"]}, "dim", "or give shapes"),
    ({"name": "t", "shapes": [{"resolution": 64, "dim": 30, "heads": 4}], "impls": ["mha.sdpa"]}, "shapes", "divisible"),
    ({"name": "t", "shapes": [{"resolution": 66, "dim": 32, "heads": 2}], "impls": ["mha.sdpa"]}, "shapes[0]", "multiple"),
    ({"name": "t", "shapes": [{"resolution": 64, "dims": 32, "heads": 2}], "impls": ["mha.sdpa"]}, "shapes[0].dims",
     "did you mean 'dim'"),
])
def test_bad_shapes(data, key, text):
    with pytest.raises(attnbench.SuiteError) as e:
        parse_suite(data)
    assert key in str(e.value) and text in str(e.value), str(e.value)


def test_pairs_name_implementations_of_the_suite():
    s = parse_suite(bad(pairs=[["mha.sdpa", "sra.conv(sr_ratio=2)"]]))
    assert s.model.pairs == [["mha.sdpa", "sra.conv(sr_ratio=2)"]]
    with pytest.raises(attnbench.SuiteError, match="pairs\\[0\\].*'mha.math' is not an implementation"):
        parse_suite(bad(pairs=[["mha.sdpa", "mha.math"]]))
    with pytest.raises(attnbench.SuiteError, match="pairs\\[0\\]"):
        parse_suite(bad(pairs=[["mha.sdpa"]]))
