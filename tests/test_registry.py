"""Registry: names, listing, typed errors, shared layouts, plugins from files and entry points."""

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch

import attnbench
from attnbench import registry
from attnbench.measure import flops as F
from conftest import ROOT, randomize_

BUILTINS = {"mha.sdpa", "mha.math", "sra.conv", "sra.linear"}


def test_builtins_listed():
    assert BUILTINS <= set(attnbench.list_impls())
    assert attnbench.list_impls("sra.*") == ["sra.conv", "sra.linear"]


def test_contract_shapes():
    for name in attnbench.list_impls():
        if name.startswith(("toy.", "mine.")):
            continue
        m = attnbench.create(name, dim=48, heads=3).eval()
        y = m(torch.randn(2, 16, 12, 48))
        assert y.shape[0] == 2 and y.shape[-1] == 48, name


def test_unknown_name_suggests_close_matches():
    with pytest.raises(attnbench.UnknownImplError) as e:
        attnbench.create("mha.sdp", dim=32, heads=2)
    assert "mha.sdpa" in e.value.close
    assert "did you mean 'mha.sdpa'" in str(e.value)
    assert isinstance(e.value, attnbench.AttnbenchError)


def test_parameter_errors_are_typed():
    with pytest.raises(attnbench.ParamError, match="sr_ratio"):
        attnbench.create("sra.conv", dim=32, heads=2, sr_ratoi=2)
    with pytest.raises(attnbench.ParamError, match="must be int"):
        attnbench.create("sra.conv", dim=32, heads=2, sr_ratio="2")
    with pytest.raises(attnbench.ParamError, match="must be bool"):
        attnbench.create("mha.sdpa", dim=32, heads=2, qkv_bias=1)


def test_params_and_descriptions():
    spec = attnbench.get_spec("sra.linear")
    assert spec.params == {"pool_size": 7, "qkv_bias": True}
    assert spec.family == "sra" and spec.description


@pytest.mark.parametrize("algorithm", sorted({s.algorithm for s in registry.specs().values()}))
def test_same_algorithm_same_layout_same_function(algorithm):
    """Implementations of one algorithm load each other's state_dict strictly and agree."""
    names = [n for n, s in registry.specs().items() if s.algorithm == algorithm]
    for a, b in itertools.combinations(names, 2):
        ma = randomize_(attnbench.create(a, dim=48, heads=3), seed=5).eval()
        mb = attnbench.create(b, dim=48, heads=3).eval()
        mb.load_state_dict(ma.state_dict(), strict=True)
        x = torch.randn(1, 14, 14, 48)
        torch.testing.assert_close(ma(x), mb(x), rtol=1e-4, atol=1e-5)


def test_register_rejects_bad_classes():
    with pytest.raises(attnbench.RegistryError):
        attnbench.register("nodot")
    with pytest.raises(attnbench.RegistryError, match="needs a default"):
        @attnbench.register("bad.nodefault")
        class Bad(torch.nn.Module):
            def __init__(self, dim, heads, size):
                super().__init__()
    with pytest.raises(attnbench.RegistryError, match="registered twice"):
        @attnbench.register("mha.sdpa")
        class Clash(torch.nn.Module):
            def __init__(self, dim, heads):
                super().__init__()


def test_plugin_file_registers_and_counts():
    added = attnbench.load_plugin_file(ROOT / "examples" / "my_attention.py")
    assert added == ["mine.talking_heads"]
    assert "mine.talking_heads" in attnbench.list_impls()
    attnbench.load_plugin_file(ROOT / "examples" / "my_attention.py")  # loading twice is harmless
    build = lambda: attnbench.create("mine.talking_heads", dim=32, heads=4)  # noqa: E731
    c = F.count_flops(build, (2, 6, 6, 32), torch.float32)
    assert c["flops_torch"] == build().flops_analytic(2, 6, 6)
    assert build()(torch.randn(2, 6, 6, 32)).shape == (2, 6, 6, 32)


def test_plugin_errors_are_typed(tmp_path):
    with pytest.raises(attnbench.PluginError, match="does not exist"):
        attnbench.load_plugin_file(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("import nonexistent_module_xyz\n")
    with pytest.raises(attnbench.PluginError, match="failed to import"):
        attnbench.load_plugin_file(bad)


def test_entry_point_plugin(tmp_path):
    """An installed package's `attnbench.impls` entry point is imported and its names listed."""
    pkg = tmp_path / "site"
    (pkg / "epattn").mkdir(parents=True)
    (pkg / "epattn" / "__init__.py").write_text(textwrap.dedent('''
        import torch
        import attnbench

        @attnbench.register("ep.proj")
        class EpProj(torch.nn.Module):
            """Registered through an entry point."""
            def __init__(self, dim, heads, width: int = 2):
                super().__init__()
                self.lin = torch.nn.Linear(dim, dim)
            def forward(self, x):
                return self.lin(x)
    '''))
    dist = pkg / "epattn-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: epattn\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[attnbench.impls]\nepattn = epattn\n")
    code = "import attnbench; print(attnbench.list_impls('ep.*')); print(attnbench.get_spec('ep.proj').params)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": f"{pkg}:{ROOT}", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['ep.proj']" in out.stdout and "{'width': 2}" in out.stdout
