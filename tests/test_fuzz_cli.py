"""CLI fuzzer: every command, in process, with random mixes of valid and invalid flags, values, prompt
files and stdin, on tiny random models saved to a temporary folder.

Each example asserts the CLI's contract: no traceback, an exit code in {0, 1, 2}, at most one error
line on stderr (exactly one on failure), and stdout holding only results. SPECEXEC_DEBUG=1 makes the
CLI re-raise unexpected exceptions, so a bug that the catch-all would hide fails the test instead.

Expensive parts are replaced: the hardware probe skips its measurements, `bench` measures nothing
(warm-up and rows stubbed) and `tune` stops with `Reached` when it starts loading models for the
search, so the fuzzer exercises argument and input validation. Example counts come from the
hypothesis profile (tests/conftest.py: "default", "fuzz-slow").
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny_cli_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from specexec_cli.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
WORD = re.compile(r"^w\d+$")
FUZZ_SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


OUTCOMES: list[int] = []  # exit codes of the generate examples, for the coverage check below


class Reached(BaseException):  # noqa: N818 - a marker, not an error
    """`tune` got past validation to the (stubbed) model loading: the valid path, not a failure."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models, a few input files, and an environment where nothing slow or global happens."""
    root = tmp_path_factory.mktemp("fuzz")
    save_tiny_cli_pair(root)
    (root / "bench.json").write_text(json.dumps([["a", "w1 w2"], ["b", "[INST] w3 [/INST]"]]))
    (root / "a-file.txt").write_text("w1")
    with pytest.MonkeyPatch.context() as patch:
        for var in ("XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "SPECEXEC_CACHE"):
            patch.setenv(var, str(root / var.lower()))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("SPECEXEC_DEBUG", "1")
        stub_expensive_parts(patch, root)
        yield root


def stub_expensive_parts(patch: pytest.MonkeyPatch, root: Path) -> None:
    from specexec_cli import bench, hardware
    from specexec_cli.models import bundled
    from specexec_cli.tuning import tune

    real_probe = hardware.probe

    def quick_probe(weights_dir=None, run_measurements=True):
        return real_probe(weights_dir=root / "weights", run_measurements=False)

    def reached(*args, **kwargs):
        raise Reached()

    def no_real_models(name):
        raise AssertionError(f"the fuzzer must not load the bundled model {name}")

    patch.setattr(bundled, "bundled_folder", no_real_models)
    patch.setattr(hardware, "probe", quick_probe)
    patch.setattr(bench, "warm_up", lambda *args, **kwargs: None)
    patch.setattr(bench, "bench_rows", lambda *args, **kwargs: [])
    patch.setattr(tune, "ModelPool", reached)


# --- input files ------------------------------------------------------------------------------

WRONG_JSON = [[], {}, None, 5, "w1", [1, 2], {"prompt": 5}, {"prompt": None}, {"prompt": ["w1"]},
              {"id": {"x": 1}, "prompt": "w1"}, {"text": "w1"}, [["a", "w1"]], ["w1", "w2"], [["a"]],
              {"prompts": [{"id": 1}]}, {"prompt": ""}, {"id": None, "prompt": "w1 w2"}]
good_prompt = st.lists(st.integers(4, 80).map(lambda i: f"w{i}"), min_size=1, max_size=4).map(" ".join)
any_text = st.one_of(good_prompt, st.text(max_size=40), st.sampled_from(["", " ", "\n", "\x00", "w1\udcff"]))


@st.composite
def file_bytes(draw) -> bytes:
    kind = draw(st.sampled_from(["bytes", "huge", "bom", "crlf", "nul", "latin1", "utf16", "json", "jsonl",
                                 "text", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "huge":
        return ("w1 " * draw(st.integers(70, 20000))).encode()
    if kind == "bom":
        return b"\xef\xbb\xbf" + json.dumps({"id": "b", "prompt": draw(good_prompt)}).encode() + b"\n"
    if kind == "crlf":
        return b"\r\n".join(json.dumps({"prompt": draw(good_prompt)}).encode() for _ in range(2)) + b"\r\n"
    if kind == "nul":
        return draw(good_prompt).encode() + b"\x00" + draw(st.binary(max_size=5))
    if kind == "latin1":
        return "w1 caf\xe9 na\xefve".encode("latin-1")
    if kind == "utf16":
        return "w1 w2".encode("utf-16")
    if kind == "json":
        return json.dumps(draw(st.sampled_from(WRONG_JSON))).encode()
    if kind == "jsonl":
        lines = draw(st.lists(st.sampled_from(WRONG_JSON) | good_prompt.map(lambda p: {"prompt": p}),
                              min_size=1, max_size=3))
        return "\n".join(json.dumps(line) for line in lines).encode()
    if kind == "text":
        return draw(any_text).encode("utf-8", "surrogateescape")
    return b""


@st.composite
def prompt_file(draw, root: Path, suffixes=(".txt", ".jsonl", ".json", "")) -> str:
    """A path to a random file, or a path that is not a readable file."""
    choice = draw(st.sampled_from(["file"] * 6 + ["missing", "folder"]))
    if choice == "missing":
        return str(root / "no-such-file.txt")
    if choice == "folder":
        return str(root)
    return write_file(root, draw(file_bytes()), draw(st.sampled_from(suffixes)))


def write_file(root: Path, data: bytes, suffix: str = ".txt") -> str:
    """A new file in `root` holding `data`; returns its path."""
    fd, path = tempfile.mkstemp(prefix="input-", suffix=suffix, dir=root)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def numbers(low: int, high: int):
    return st.one_of(st.integers(low, high).map(str), st.sampled_from(["x", "", "1.5", "-0", "99999999999"]))


FLOATS = st.one_of(st.floats(-2, 2, allow_nan=False).map(repr), st.sampled_from(["nan", "inf", "-inf", "a"]))
DEVICES = st.sampled_from(["cpu", "cuda", "cuda:3", "tpu9", "", "meta", "mps", "cpu:0", "xpu"])


def optional(flag: str, values) -> st.SearchStrategy[list[str]]:
    return st.one_of(st.just([]), values.map(lambda v: [flag, v]))


def flags(*parts: st.SearchStrategy[list[str]]) -> st.SearchStrategy[list[str]]:
    """Concatenate optional flag groups, then shuffle nothing: click accepts any order."""
    return st.tuples(*parts).map(lambda groups: [arg for group in groups for arg in group])


# --- checks -------------------------------------------------------------------------------------


def check_contract(result, stdout_ok=lambda out: True) -> None:
    """The CLI's promises, for any input."""
    if result is None:  # tune reached the stubbed search: valid input
        return
    if result.exit_code == 2 and result.output.startswith("Usage:") and "Commands:" in result.output:
        return  # a command group without its subcommand prints its help, as click does
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code in (0, 1, 2), (result.exit_code, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error:")]
    assert len(errors) == (0 if result.exit_code == 0 else 1), result.stderr
    assert stdout_ok(result.stdout), result.stdout


def generated_only(as_json: bool):
    def ok(out: str) -> bool:
        for line in out.splitlines():
            if as_json:
                record = json.loads(line)
                assert {"id", "text", "new_tokens"} <= record.keys()
            else:
                assert all(WORD.match(word) for word in line.split()), line
        return True

    return ok


def invoke(args: list[str], stdin: bytes | None = None):
    if os.environ.get("FUZZ_TRACE"):
        print("ARGS", args, (stdin or b"")[:60], file=sys.__stderr__, flush=True)
    state = torch.get_num_threads(), torch.random.get_rng_state()
    try:
        return CliRunner().invoke(main, args, input=stdin)
    except Reached:  # a BaseException: CliRunner lets it through
        return None
    finally:
        torch.set_num_threads(state[0])
        torch.random.set_rng_state(state[1])


# --- the commands -------------------------------------------------------------------------------


def generate_flags(root: Path) -> dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]]:
    """flag -> (valid values, invalid values) for `generate`."""
    ints = lambda low, high: st.integers(low, high).map(str)  # noqa: E731
    bad_ints = st.sampled_from(["x", "", "1.5", "-1", "0", "99999999999"])
    return {
        "--draft": (st.sampled_from([str(root / "draft"), "none", "first-layers:1", "first-layers:3"]),
                    st.sampled_from(["first-layers:0", "first-layers:999", "first-layers:x", "no-such", ""])),
        "--method": (st.sampled_from(["specexec", "specinfer", "autoregressive"]), st.just("beam")),
        "--budget": (ints(1, 8), bad_ints), "--max-n-beams": (ints(1, 4), bad_ints),
        "--max-beam-len": (ints(1, 4), bad_ints), "--max-branch-width": (ints(1, 4), bad_ints),
        "--temperature": (st.sampled_from(["0", "0.7", "1.5"]), st.sampled_from(["-1", "nan", "inf", "a"])),
        "--top-p": (st.sampled_from(["1", "0.9", "0.5"]), st.sampled_from(["0", "1.5", "nan", "-inf"])),
        "--top-k": (ints(0, 5), st.sampled_from(["-2", "k"])), "--seed": (ints(0, 10), st.just("-1")),
        "--stop": (any_text, st.just("")), "--system": (any_text, st.just("\x00")),
        "--device": (st.just("cpu"), DEVICES),
        "--dtype": (st.sampled_from(["fp32", "bf16"]), st.sampled_from(["fp8", ""])),
        "--input-format": (st.sampled_from(["auto", "text", "jsonl"]), st.just("xml")),
        "--offload": (st.sampled_from(["none", "ram", "disk", "auto"]), st.just("cloud")),
        "--quant": (st.sampled_from(["fp32", "bf16"]), st.sampled_from(["gptq", "q3"])),
        "--buffers": (ints(2, 3), bad_ints), "--resident-layers": (ints(0, 3), bad_ints),
        "--offload-dir": (st.just(str(root / "offload")),
                          st.sampled_from(["/proc/nope", str(root / "a-file.txt")])),
    }


@st.composite
def generate_args(draw, root: Path) -> tuple[list[str], bytes | None]:
    """Mostly valid runs (a bad value in some flags), so that generation itself is fuzzed too."""
    bad_share = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5]))
    table = generate_flags(root)
    chosen = draw(st.lists(st.sampled_from(sorted(table)), max_size=6, unique=True))
    # --target is always given: the default is the bundled real model, far too slow for a fuzzer
    target = st.sampled_from([str(root / "nope"), "no-such-model", "", "a/b", str(root / "a-file.txt")])
    args = ["generate", "--no-profile", "--draft", str(root / "draft"), "--target",
            str(root / "target") if draw(st.floats(0, 1)) >= bad_share else draw(target),
            "-n", draw(st.sampled_from(["1", "2", "3"]) if bad_share < 0.5 else st.sampled_from(["0", "x"]))]
    for flag in chosen:
        valid, invalid = table[flag]
        args += [flag, draw(invalid if draw(st.floats(0, 1)) < bad_share else valid)]
    args += draw(st.sampled_from([[], ["--stream"], ["--json"], ["--stream", "--json"]]))
    args += draw(st.sampled_from([[], ["-v"], ["--no-chat-template"], ["--bogus-flag"] * (bad_share > 0)]))
    if bad_share == 0:
        good_file = good_prompt.map(lambda p: ["-f", write_file(root, p.encode())])
        inputs = draw(st.lists(good_prompt.map(lambda p: ["-p", p]) | good_file, min_size=1, max_size=2))
        stdin = None
    else:
        inputs = draw(st.lists(st.one_of(any_text.map(lambda t: ["-p", t]), st.just(["-p", "-"]),
                                         prompt_file(root).map(lambda f: ["-f", f]), st.just(["-f", "-"])),
                               max_size=3))
        stdin = draw(st.one_of(st.none(), good_prompt.map(str.encode), file_bytes()))
    args += [arg for pair in inputs for arg in pair]
    return args, stdin


@settings(**FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_generate(world, data):
    args, stdin = data.draw(generate_args(world))
    result = invoke(args, stdin)
    check_contract(result, generated_only("--json" in args))
    OUTCOMES.append(result.exit_code)
    if os.environ.get("FUZZ_TRACE"):
        print("RESULT", result.exit_code, result.stderr[-300:], file=sys.__stderr__)


@st.composite
def tune_args(draw, root: Path) -> list[str]:
    target = st.sampled_from([str(root / "target")] * 3 + ["no-such-model", str(root / "nope"), ""])
    csv = st.sampled_from(["1,2", "4", "", "x", "1,,2", "-1", "0", "5000", "2,a"])
    args = ["tune", "--target", draw(target)]
    args += draw(flags(
        optional("--draft", st.sampled_from([str(root / "draft"), "none", "first-layers:1", "first-layers:0",
                                             "no-such"])),
        optional("--quant", st.sampled_from(["fp32", "bf16", "nf4", "q3", ""])),
        optional("--early-exit", csv), optional("--budgets", csv), optional("--trials", numbers(-1, 3)),
        optional("--timeout", FLOATS), optional("--prompts", prompt_file(root)),
        optional("--n-prompts", numbers(-1, 3)), optional("--max-new-tokens", numbers(-1, 4)),
        optional("--study", any_text), optional("--device", DEVICES),
        optional("--batch-prompts", prompt_file(root)), optional("--batch-sizes", csv),
        optional("--batch-new-tokens", numbers(-1, 4)),
        st.sampled_from([[], ["--no-save"], ["--bogus"]]),
    ))
    return args


@settings(**FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_tune(world, data):
    result = invoke(data.draw(tune_args(world)))
    check_contract(result, lambda out: out == "")


@st.composite
def bench_args(draw, root: Path) -> list[str]:
    csv = st.sampled_from(["1,2", "4", "", "x", "0", "-3", "2,a"])
    args = ["bench", "--target", str(root / "target"), "--draft", str(root / "draft"), "--no-assisted"]
    args += draw(flags(
        optional("--prompts", st.one_of(st.just(str(root / "bench.json")),
                                        prompt_file(root, suffixes=(".json",)))),
        optional("--n-prompts", numbers(-1, 3)), optional("-n", numbers(-1, 3)),
        optional("--temperature", FLOATS), optional("--budgets", csv), optional("--specinfer-budgets", csv),
        optional("--methods", st.sampled_from(["specexec", "specexec,autoregressive", "", "nope",
                                               "assisted"])),
        optional("--threads", numbers(-1, 2)), optional("--device", DEVICES),
        optional("--draft", st.sampled_from([str(root / "draft"), "no-such", "first-layers:1"])),
        st.sampled_from([[], ["--json"]]),
    ))
    return args


@settings(**FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_bench(world, data):
    result = invoke(data.draw(bench_args(world)))
    check_contract(result, lambda out: out.strip() == "")


@st.composite
def small_command_args(draw, root: Path) -> list[str]:
    """probe, models and profiles, with random files in the profile folder."""
    folder = root / "xdg_config_home" / "specexec" / "profiles"
    folder.mkdir(parents=True, exist_ok=True)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(["target@x.json", "t.json", "other@y.json", "junk.txt"]))
        (folder / name).write_bytes(draw(st.one_of(file_bytes(), st.just(b'{"schema_version": 1}'))))
    ref = st.one_of(any_text, st.sampled_from(["target", "t", "target@x.json", str(folder / "t.json")]))
    return draw(st.one_of(
        st.sampled_from([["probe"], ["probe", "--json"], ["probe", "--refresh", "--json"], ["probe", "-x"]]),
        st.sampled_from([["models"], ["models", "--json"], ["models", "--local"], ["models", "extra"]]),
        st.sampled_from([["profiles"], ["profiles", "list"], ["profiles", "nope"]]),
        st.tuples(st.sampled_from(["show", "rm"]), ref, st.sampled_from([[], ["--json"]]))
        .map(lambda t: ["profiles", t[0], t[1], *(t[2] if t[0] == "show" else [])]),
    ))


def small_stdout_ok(args: list[str]):
    def ok(out: str) -> bool:
        if "--json" in args and out.strip() and args[0] != "models":
            json.loads(out)
        if args[0] == "models" and "--json" in args:
            for line in out.splitlines():
                json.loads(line)
        return "error" not in out.lower() or args[0] == "profiles"

    return ok


@settings(**FUZZ_SETTINGS)
@given(data=st.data())
def test_fuzz_small_commands(world, data):
    args = data.draw(small_command_args(world))
    result = invoke(args)
    check_contract(result, small_stdout_ok(args))


def test_fuzzer_reaches_generation():
    """The generate fuzzer is no use if every example stops at validation: some must succeed."""
    if not OUTCOMES:
        pytest.skip("runs after test_fuzz_generate")
    assert OUTCOMES.count(0) >= max(1, len(OUTCOMES) // 10), OUTCOMES
