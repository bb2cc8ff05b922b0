"""CUDA paths a review found wrong, checked on a CPU with fakes: the current stream after a failed graph
capture, the capture's stream, CUDA allocation failures as out-of-memory, TF32 switches set through torch's
new ``fp32_precision`` API, a pool executor's driver that measures nothing (no L2 flush buffer, no dtype
probe), and compile_s when the largest-batch search compiled the shape first."""

import pytest
import torch

from attnbench import cell, device as device_mod, runner
from attnbench.measure import timing
from conftest import FAST_TIMING, make_suite

CUDA = torch.device("cuda")


# --- 1, 2. graph capture: the current stream restored, the capture on the side stream ---------------

@pytest.fixture
def fake_streams(monkeypatch):
    """Fake CUDA streams, events and graphs that track the current stream as torch does:
    ``torch.cuda.graph`` enters its stream on ``__enter__`` before ``capture_begin`` and leaves it on
    ``__exit__`` after ``capture_end``, with no ``finally`` (so a capture that raises leaves it current).
    ``state["fail"]`` makes ``capture_begin`` raise, ``state["end_fail"]`` makes ``capture_end`` raise."""
    state = {"fail": None, "end_fail": None, "graph_streams": [], "streams": []}

    class Stream:
        def __init__(self, device=None, name="side"):
            self.device, self.name = device, name
            state["streams"].append(self)

        def wait_stream(self, other):
            pass

    default = Stream(CUDA, name="default")
    state["current"] = default

    class StreamContext:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            self.prev, state["current"] = state["current"], self.stream

        def __exit__(self, *exc):
            state["current"] = self.prev
            return False

    class CUDAGraph:
        def capture_begin(self):
            if state["fail"]:
                raise state["fail"]

        def capture_end(self):
            if state["end_fail"]:
                raise state["end_fail"]

        def replay(self):
            pass

    class Graph:  # torch.cuda.graph, as in torch 2.11 to 2.14
        def __init__(self, graph, pool=None, stream=None, **kwargs):
            self.graph = graph
            state["graph_streams"].append(stream)
            self.ctx = StreamContext(stream if stream is not None else Stream(None, name="graph default"))

        def __enter__(self):
            self.ctx.__enter__()
            self.graph.capture_begin()

        def __exit__(self, *exc):
            self.graph.capture_end()
            self.ctx.__exit__(*exc)
            return False

    class Event:
        def __init__(self, enable_timing=False):
            pass

        def record(self, stream=None):
            pass

        def elapsed_time(self, end):
            return 1.0

    def set_stream(stream):
        state["current"] = stream

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "set_stream", set_stream)
    monkeypatch.setattr(torch.cuda, "stream", StreamContext)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", CUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", Graph)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    state["default"] = default
    return state


@pytest.mark.parametrize("where", ["fail", "end_fail"])
def test_a_failed_capture_puts_the_current_stream_back(fake_streams, where):
    state = fake_streams
    state[where] = RuntimeError("operation not permitted when stream is capturing")
    call = lambda: None  # noqa: E731
    timed, method = timing.graph_or_events(call, CUDA)
    assert timed is call and method == ("cuda_events (graph capture failed: RuntimeError: operation not permitted "
                                        "when stream is capturing)")
    assert state["current"] is state["default"]  # not the capture's side stream for the rest of the process


def test_capture_runs_on_the_side_stream_made_on_the_device(fake_streams):
    state = fake_streams
    _timed, method = timing.graph_or_events(lambda: None, CUDA)
    assert method == "cuda_graph_replay" and state["current"] is state["default"]
    side = state["graph_streams"][0]
    assert side is not None and side.name == "side" and side.device == CUDA  # not torch's process-wide default


# --- 3. CUDA allocation failures are out-of-memory --------------------------------------------------

@pytest.mark.parametrize("exc", [
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.cuda.OutOfMemoryError("CUDA out of memory."),
    MemoryError(),
])
def test_cuda_allocation_failures_are_oom(exc):
    assert device_mod.is_oom(exc)


def test_other_errors_are_not_oom():
    assert not device_mod.is_oom(RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED"))
    assert not device_mod.is_oom(ValueError("ALLOC_FAILED"))  # a RuntimeError's text only


# --- 4. TF32 switches set through torch's new fp32_precision API ------------------------------------

@pytest.fixture
def new_tf32_api():
    """torch's TF32 state as a user of the new API leaves it (matmul and cuDNN convolutions "tf32", cuDNN
    RNNs "ieee"), where torch >= 2.9 refuses to read the legacy ``allow_tf32`` flags; put back afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision API")
    saved = (matmul.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision,
             torch.get_num_threads())
    matmul.fp32_precision = "tf32"
    cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = "tf32", "ieee"
    with pytest.raises(RuntimeError, match="legacy and new APIs"):
        matmul.allow_tf32  # noqa: B018 - the state reproduced: the legacy read raises
    yield
    matmul.fp32_precision, cudnn.fp32_precision, cudnn.conv.fp32_precision, cudnn.rnn.fp32_precision = saved[:4]
    torch.set_num_threads(saved[4])
    matmul.allow_tf32, cudnn.allow_tf32 = False, True  # torch's defaults, through the legacy API again


def test_tf32_reads_fall_back_to_the_new_api(new_tf32_api):
    assert device_mod.tf32_enabled("matmul") is True and device_mod.tf32_enabled("cudnn") is True
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    assert device_mod.tf32_enabled("matmul") is False and device_mod.tf32_enabled("cudnn") is False


def test_tf32_globals_saved_applied_and_restored_under_the_new_api(new_tf32_api):
    saved = device_mod.saved_globals()
    assert saved[1:] == (True, True)
    state = device_mod.apply_globals(None, False, CUDA)
    assert state["tf32"] is False and state["tf32_cudnn"] is False
    device_mod.restore_globals(saved)
    assert device_mod.tf32_enabled("matmul") is True and device_mod.tf32_enabled("cudnn") is True


def test_tf32_set_falls_back_to_the_new_api_when_the_legacy_set_raises(monkeypatch):
    class Backend:  # a torch whose legacy setter refuses (the mixed state), with the new API beside it
        fp32_precision = "none"

        @property
        def allow_tf32(self):
            raise RuntimeError("you have used mix of the legacy and new APIs")

        @allow_tf32.setter
        def allow_tf32(self, value):
            raise RuntimeError("you have used mix of the legacy and new APIs")

    class Cudnn(Backend):
        conv, rnn = Backend(), Backend()

    matmul, cudnn = Backend(), Cudnn()
    monkeypatch.setattr(torch.backends.cuda, "matmul", matmul)
    monkeypatch.setattr(torch.backends, "cudnn", cudnn)
    device_mod.set_tf32("matmul", True)
    device_mod.set_tf32("cudnn", True)
    assert matmul.fp32_precision == "tf32" and cudnn.conv.fp32_precision == cudnn.rnn.fp32_precision == "tf32"
    assert device_mod.tf32_enabled("matmul") is True and device_mod.tf32_enabled("cudnn") is True
    device_mod.set_tf32("matmul", False)
    assert matmul.fp32_precision == "ieee" and device_mod.tf32_enabled("matmul") is False


# --- 5. a pool executor's driver measures nothing: no flush buffer, no dtype probe -------------------

def test_the_driver_of_a_pool_allocates_no_flush_buffer_and_probes_no_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_FAKE_GPUS", "1")
    flushers, probes = [], []
    real_flusher, real_probe = timing.l2_flusher, runner.dtype_problem
    monkeypatch.setattr(timing, "l2_flusher", lambda device: flushers.append(device) or real_flusher(device))
    monkeypatch.setattr(runner, "dtype_problem", lambda name, dev: probes.append(name) or real_probe(name, dev))
    suite = make_suite(["toy.proj"], timing={**FAST_TIMING, "l2_flush": True})
    rows = runner.run_suite(suite, out=tmp_path / "r", progress=False, executor="gpus").rows
    assert [r["status"] for r in rows] == ["ok"], rows[0]["message"]
    assert flushers == [] and probes == []  # the worker flushes and probes on its own GPU


def test_a_worker_reports_an_unsupported_dtype_per_cell(monkeypatch):
    """The driver of a pool no longer probes the dtypes: the worker's cell says why it cannot run."""
    _suite, _dev, cases = runner.prepare(make_suite(["toy.proj"], dtype="bfloat16"))
    monkeypatch.setitem(device_mod._dtype_problems, ("bfloat16", "cpu"), "bfloat16 is not supported by this toy GPU")
    from attnbench.job import CellSettings, Job

    row = cell.measure_cell(Job(case=cases[0], settings=CellSettings()))
    assert row["status"] == "unsupported" and row["message"] == "bfloat16 is not supported by this toy GPU"


def test_prepare_without_the_probe_keeps_a_dtype_the_driver_could_not_run(monkeypatch):
    monkeypatch.setitem(device_mod._dtype_problems, ("float16", "cpu"), "float16 is not supported by this toy device")
    _suite, _dev, cases = runner.prepare(make_suite(["toy.proj"], dtype="float16"), probe_dtypes=False)
    assert [c.dtype for c in cases] == ["float16"]


# --- 8. compile_s with the largest-batch search --------------------------------------------------------

def test_compile_s_is_the_compile_the_batch_search_made(tmp_path, monkeypatch, scripted_calls):
    """The search's call at the found batch is that shape's compilation (5 s here): compile_s, not the
    measured first call after it (already compiled: 10 ms). On CPU the search's one-image estimate
    compiles batch 1 first; batch 2 is compiled again (static shapes)."""
    import torch._dynamo

    def fake_compile(module, *args, **kwargs):
        torch._dynamo.utils.counters["stats"]["unique_graphs"] += 1
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    compiled = set()  # the batches compiled: the first call of each shape takes 5 s, the rest 10 ms

    def cost(module, x):
        first = x.shape[0] not in compiled
        compiled.add(x.shape[0])
        return 5.0 if first else 0.01

    scripted_calls.cost = cost
    row = runner.run_suite(make_suite(["toy.proj"], compile=True, find_max_batch=True, batch=2,
                                      budget={"cell_time_s": 2.0}, timing={**FAST_TIMING, "sentinel": False}),
                           out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == "ok", row["message"]
    assert row["batch_search"] == [{"batch": 2, "fits": True}] and compiled == {1, 2}
    assert row["compile_s"] == pytest.approx(5.0)
    assert row["latency_ms_samples"] == [10.0] * row["latency_n"]


@pytest.mark.slow
def test_compile_s_with_the_batch_search_for_real(tmp_path):
    """A real CPU compilation (toy shapes): with the search compile_s is the compilation of the found
    shape, not one call of the already compiled program."""
    row = runner.run_suite(make_suite(["toy.proj"], compile=True, find_max_batch=True, batch=2,
                                      timing={**FAST_TIMING, "sentinel": False}),
                           out=tmp_path / "r", progress=False).rows[0]
    assert row["status"] == "ok", row["message"]
    # batch 2 recompiled (the one-image estimate compiled batch 1): ~0.04 s here, a call ~0.04 ms (~8 ms when
    # other processes take the CPU); before, compile_s was one call of the compiled program
    assert row["compile_s"] > max(0.005, 10 * row["latency_ms_min"] / 1e3), (row["compile_s"], row["latency_ms_min"])


def test_the_environment_record_reads_tf32_under_the_new_api(new_tf32_api):
    """env.json is written on every run, CPU included: its TF32 fields must not raise in that state."""
    from attnbench.measure.env import collect_env

    record = collect_env(torch.device("cpu"))["torch"]
    assert record["tf32_matmul"] is True and record["tf32_cudnn"] is True
    assert isinstance(record["float32_matmul_precision"], str)


def test_a_compiled_train_cell_compiles_one_program(tmp_path):
    """The train call takes its output gradient's shape from the uncompiled module: asking the compiled one
    compiled a no-grad program no timed call runs (2 graphs, its compile outside compile_s)."""
    suite = make_suite(["swin.window"], resolution=(64,), dim=32, heads=2, compile=True, mode=["forward", "train"])
    rows = runner.run_suite(suite, tmp_path / "run", progress=False).rows
    for row in rows:
        assert row["status"] == "ok", row["message"]
        assert (row["compile_graphs"], row["compile_graph_breaks"]) == (1, 0), row["mode"]


def test_a_compile_loaded_from_inductors_cache_is_said(tmp_path):
    """compile_s of a graph inductor already compiled in another cell is a load from its on-disk cache:
    the row counts the hits, so a fast compile_s is not read as a fast compiler."""
    import torch._inductor.config as inductor_config

    if not inductor_config.fx_graph_cache or inductor_config.force_disable_caches:
        pytest.skip("inductor's FX graph cache is off here")
    suite = make_suite(["swin.window"], resolution=(48,), dim=32, heads=2, compile=True)
    first = runner.run_suite(suite, tmp_path / "a", progress=False).rows[0]
    again = runner.run_suite(suite, tmp_path / "b", progress=False).rows[0]
    assert first["status"] == again["status"] == "ok"
    assert again["compile_cache_hits"] >= 1 and first["compile_cache_hits"] <= again["compile_cache_hits"]
