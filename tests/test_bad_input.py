"""Bad input, as a user types it: exit code 2, one clear message naming what and where, no traceback.

One table: a name, the files the case needs (``{tmp}`` in names, contents and arguments is the test's
folder), the command line, the exit code, and words the message must contain. Add a case with one
line. Each case runs the CLI in this process (``attnbench.cli.main``); the subprocess test in
test_cli.py covers the real entry point.
"""

import json

import pytest

from attnbench.cli import main
from conftest import FAST_TIMING, TOY_PLUGIN

GOOD = {"name": "t", "device": "cpu", "dim": 16, "heads": 2, "resolution": [32], "impls": ["mha.sdpa"],
        "timing": FAST_TIMING, "measure_peaks": False}
OTHER = {**GOOD, "name": "other", "seed": 7}


def suite(**changes) -> str:
    return json.dumps({**GOOD, **changes})


ROW = json.dumps({"impl": "mha.sdpa", "label": "mha.sdpa", "status": "ok", "resolution": 32, "cell_id": "x"}) + "\n"

CASES = [
    # name, files {relative path: content}, argv, exit code, words the message must contain
    ("suite missing", {}, ["run", "{tmp}/nope.yaml"], 2, ["nope.yaml", "not found"]),
    ("not YAML", {"s.yaml": "name: [t\n"}, ["run", "{tmp}/s.yaml"], 2, ["s.yaml", "not valid YAML", "line"]),
    ("not a mapping", {"s.yaml": "- a\n- b\n"}, ["run", "{tmp}/s.yaml"], 2, ["must be a mapping"]),
    ("unknown key", {"s.yaml": suite(resolutoin=[32])}, ["run", "{tmp}/s.yaml"], 2,
     ["resolutoin", "unknown key", "did you mean 'resolution'"]),
    ("unknown implementation", {"s.yaml": suite(impls=["mha.sdpaa"])}, ["run", "{tmp}/s.yaml"], 2,
     ["impls[0]", "unknown implementation 'mha.sdpaa'", "did you mean"]),
    ("parameter not taken", {"s.yaml": suite(impls=[{"sra.conv": {"sr": 2}}])}, ["run", "{tmp}/s.yaml"], 2,
     ["impls[0].sra.conv", "takes no parameter 'sr'", "sr_ratio"]),
    ("parameter of the wrong type", {"s.yaml": suite(impls=[{"sra.conv": {"sr_ratio": "8"}}])},
     ["run", "{tmp}/s.yaml"], 2, ["sr_ratio", "must be int"]),
    ("bad parameter value", {"s.yaml": suite(impls=[{"swin.window": {"window": 0}}])}, ["run", "{tmp}/s.yaml"], 2,
     ["impls[0]", "cannot be built"]),
    ("dim not divisible by heads", {"s.yaml": suite(heads=3)}, ["run", "{tmp}/s.yaml"], 2, ["heads", "divisible"]),
    ("resolution not a multiple of patch", {"s.yaml": suite(resolution=[30])}, ["run", "{tmp}/s.yaml"], 2,
     ["resolution[0]", "multiple of patch"]),
    ("every problem reported", {"s.yaml": suite(resolution=[30], impls=["nope.x"], heads=3)},
     ["run", "{tmp}/s.yaml"], 2, ["resolution[0]", "impls[0]", "heads"]),
    ("a key typo and a parameter typo", {"s.yaml": suite(resolutoin=[32], impls=[{"sra.conv": {"sr_raito": 8}}])},
     ["run", "{tmp}/s.yaml"], 2, ["resolutoin", "did you mean 'resolution'", "impls[0].sra.conv", "sr_raito"]),
    ("repeats the wrong way round", {"s.yaml": suite(timing={"min_repeats": 9, "max_repeats": 3})},
     ["run", "{tmp}/s.yaml"], 2, ["timing", "min_repeats 9 exceeds max_repeats 3"]),
    ("negative warm-up", {"s.yaml": suite(timing={"warmup_s": -1})}, ["run", "{tmp}/s.yaml"], 2, ["warmup_s"]),
    ("device string in the suite", {"s.yaml": suite(device="tpu")}, ["run", "{tmp}/s.yaml"], 2, ["device"]),
    ("--device tpu", {"s.yaml": suite()}, ["run", "{tmp}/s.yaml", "--device", "tpu"], 2,
     ["'tpu'", "auto, cpu, cuda, cuda:N"]),
    ("--device cuda:x", {"s.yaml": suite()}, ["run", "{tmp}/s.yaml", "--device", "cuda:x"], 2, ["'cuda:x'"]),
    ("--device mps", {"s.yaml": suite()}, ["run", "{tmp}/s.yaml", "--device", "mps"], 2, ["'mps'"]),
    ("--device meta", {"s.yaml": suite()}, ["run", "{tmp}/s.yaml", "--device", "meta"], 2, ["'meta'"]),
    ("--only selecting nothing", {"s.yaml": suite()}, ["run", "{tmp}/s.yaml", "--only", "swin.*"], 2,
     ["--only", "selects no cell", "mha.sdpa"]),
    ("--out naming a file", {"s.yaml": suite(), "afile": "x"}, ["run", "{tmp}/s.yaml", "--out", "{tmp}/afile"], 2,
     ["afile", "is a file"]),
    ("--out holding a run", {"s.yaml": suite(), "run/rows.jsonl": ROW}, ["run", "{tmp}/s.yaml", "--out", "{tmp}/run"],
     2, ["already holds a run", "--resume"]),
    ("--resume with another suite", {"s.yaml": suite(), "run/rows.jsonl": ROW, "run/suite.yaml": json.dumps(OTHER)},
     ["run", "{tmp}/s.yaml", "--out", "{tmp}/run", "--resume"], 2, ["another suite", "name", "seed"]),
    ("--resume with nothing to resume", {"s.yaml": suite()},
     ["run", "{tmp}/s.yaml", "--resume", "--results-root", "{tmp}/empty"], 2, ["no earlier run"]),
    ("plugin file missing", {"s.yaml": suite(plugins=["{tmp}/gone.py"])}, ["run", "{tmp}/s.yaml"], 2,
     ["plugins[0]", "does not exist"]),
    ("plugin failing to import", {"s.yaml": suite(plugins=["{tmp}/bad.py"]), "bad.py": "raise ValueError('boom')\n"},
     ["run", "{tmp}/s.yaml"], 2, ["plugins[0]", "failed to import", "boom"]),
    ("list matching nothing", {}, ["list", "nothing.*"], 2, ["no implementation matches"]),
    ("list with a missing plugin", {}, ["list", "--plugin", "{tmp}/gone.py"], 2, ["does not exist"]),
    ("show on a folder that is not a run", {"empty/x.txt": ""}, ["show", "{tmp}/empty"], 2, ["not a run folder"]),
    ("show on a missing folder", {}, ["show", "{tmp}/nowhere"], 2, ["nowhere"]),
    ("show with a filter matching nothing", {"run/rows.jsonl": ROW}, ["show", "{tmp}/run", "--impl", "swin.*"], 2,
     ["no cell of", "swin.*"]),
    ("show on rows of a newer schema", {"run/rows.jsonl": json.dumps({"status": "ok", "schema_version": 99}) + "\n"},
     ["show", "{tmp}/run"], 2, ["schema version 99", "upgrade"]),
    ("show on a corrupt row", {"run/rows.jsonl": ROW + "{oops\n" + ROW}, ["show", "{tmp}/run"], 2,
     ["line 2", "not valid JSON"]),
    ("plot on a missing folder", {}, ["plot", "{tmp}/nowhere"], 2, ["nowhere"]),
    ("compare with a missing folder", {"run/rows.jsonl": ROW}, ["compare", "{tmp}/run", "{tmp}/nowhere"], 2,
     ["nowhere", "does not exist"]),
    ("check with an ambiguous threshold", {"run/rows.jsonl": ROW},
     ["check", "{tmp}/run", "--baseline", "{tmp}/run", "--max-slowdown", "10"], 2, ["ambiguous", "10%"]),
]


@pytest.mark.parametrize("name,files,argv,code,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, files, argv, code, words, tmp_path, capsys):
    for rel, content in files.items():
        path = tmp_path / rel.format(tmp=tmp_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content.replace("{tmp}", str(tmp_path)))
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got = main(args)
    out = capsys.readouterr()
    assert got == code, (name, out.out, out.err)
    assert "Traceback" not in out.err + out.out
    assert "attnbench: error:" in out.err, out.err
    message = out.err[out.err.index("attnbench: error:"):]
    for word in words:
        assert word in message, (name, word, message)


def test_the_toy_plugin_is_there():  # the table's plugin cases would pass for the wrong reason without it
    assert TOY_PLUGIN.is_file()
