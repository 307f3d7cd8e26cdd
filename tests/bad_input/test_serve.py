"""The bad-input catalogue of `sample`, `eval`, `serve` and `bench`: each case refuses in one line.

CLI cases go through `tests/bad_input/__init__.py` (`refuse` in this process, `refuse_subprocess` for `serve`, which
must bind a real socket); the server's request cases send real HTTP requests to a `nanogpt serve` process
and expect a 400 that names the field. Checkpoints are real ones written by `save_model`, exports real
ones written by `nanogpt export`.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from nanogpt.data.shards import ShardWriter, write_meta
from nanogpt.data.tokenizer import get_tokenizer
from nanogpt.model.gpt import NanoGPTLMHeadModel
from nanogpt.train.checkpoint import save_model
from tests.bad_input import refuse, refuse_subprocess
from tests.local_server import Server, post
from tests.serve.test_lifecycle import wait_for
from tests.tiny import tiny_config

CONTEXT = 16
SERVE_TIMEOUT = 60  # a fresh interpreter imports torch and FastAPI; on a loaded machine that takes a while


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad_serve")


@pytest.fixture(scope="module")
def ckpt(root) -> Path:
    torch.manual_seed(0)
    return save_model(root / "ckpt", NanoGPTLMHeadModel(tiny_config(context_length=CONTEXT)))


@pytest.fixture(scope="module")
def exports(ckpt, root) -> dict[str, Path]:
    """What `nanogpt export` writes, in both formats."""
    from nanogpt.export.hf import export

    return {fmt: export(ckpt, root / f"hf-{fmt}", fmt).out for fmt in ("remote-code", "gpt2")}


@pytest.fixture(scope="module")
def data(root) -> Path:
    """A prepared data folder with a 'val' split of a few hundred tokens."""
    tok = get_tokenizer()
    out = root / "data"
    out.mkdir()
    w = ShardWriter(out / "val_00000.bin", vocab_size=tok.vocab_size)
    w.write(tok.encode("To be, or not to be, that is the question. " * 20) + [tok.eot_id])
    w.close()
    write_meta(out, {"val": {"shards": ["val_00000.bin"], "tokens": w.n_tokens, "documents": 1}}, {})
    return out


@pytest.fixture
def text(tmp_path) -> Path:
    p = tmp_path / "held_out.txt"
    p.write_text("Now is the winter of our discontent made glorious summer. " * 4)
    return p


def variant(ckpt: Path, dst: Path, config: object = None, weights: bytes | None = None) -> Path:
    """A copy of `ckpt` with its config.json replaced by `config` (JSON) and/or its weights by `weights`."""
    shutil.copytree(ckpt, dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    if weights is not None:
        (dst / "model.safetensors").write_bytes(weights)
    return dst


def config_with(ckpt: Path, **changes: object) -> dict:
    return {**json.loads((ckpt / "config.json").read_text()), **changes}


# --- sample ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, names, fix",
    [
        pytest.param(["--temperature", "inf"], "temperature=inf", "finite number >= 0", id="sample_temperature_inf"),
        pytest.param(["--temperature", "nan"], "temperature=nan", "finite number >= 0", id="sample_temperature_nan"),
        pytest.param(["--temperature", "-1"], "temperature=-1", "--temperature 0.8", id="sample_temperature_negative"),
        pytest.param(["--top-p", "nan"], "top_p=nan", "(0, 1]", id="sample_top_p_nan"),
        pytest.param(["--top-p", "0"], "top_p=0", "--top-p 0.9", id="sample_top_p_zero"),
        pytest.param(["--top-p", "1.5"], "top_p=1.5", "--top-p 0.9", id="sample_top_p_above_one"),
        pytest.param(["--top-k", "-3"], "top_k=-3", "--top-k 50", id="sample_top_k_negative"),
        pytest.param(["--top-k", "2.5"], "invalid int value", "--help", id="sample_top_k_not_an_integer"),
        pytest.param(["--seed", "-1"], "seed=-1", "0..2**64-1", id="sample_seed_negative"),
        pytest.param(["--seed", str(2**64)], "seed=", "0..2**64-1", id="sample_seed_beyond_uint64"),
        pytest.param(["--max-new-tokens", "-5"], "--max-new-tokens -5", ">= 0", id="sample_max_new_tokens_negative"),
        pytest.param(["--num-samples", "0"], "--num-samples 0", "at least 1", id="sample_num_samples_zero"),
        pytest.param(["--device", "tpu"], "unknown device 'tpu'", "use auto, cpu", id="sample_unknown_device"),
        pytest.param(["--backend", "mlx", "--compile"], "--compile is torch.compile", "drop --compile", id="sample_compile_mlx"),
    ],
)  # fmt: skip
def test_sample_flag_refused(capsys, ckpt, flags, names, fix):
    refuse(capsys, ["sample", "--model", str(ckpt), *flags], names=names, fix=fix, untouched=[ckpt])


def test_sample_prompt_longer_than_context(capsys, ckpt):
    refuse(
        capsys,
        ["sample", "--model", str(ckpt), "--prompt", "to be or not " * CONTEXT],
        names=f"the context is {CONTEXT}",
        fix="--crop",
        untouched=[ckpt],
    )


def test_sample_prompt_file_missing(capsys, ckpt, tmp_path):
    missing = tmp_path / "prompt.txt"
    refuse(
        capsys,
        ["sample", "--model", str(ckpt), "--prompt-file", str(missing)],
        names=[str(missing), "not found"],
        fix="existing text file",
    )


def test_sample_prompt_file_is_a_folder(capsys, ckpt, tmp_path):
    refuse(
        capsys,
        ["sample", "--model", str(ckpt), "--prompt-file", str(tmp_path)],
        names="is a folder",
        fix="pass a text file",
        untouched=[tmp_path],
    )


def test_sample_prompt_file_not_utf8(capsys, ckpt, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café".encode("latin-1"))
    refuse(
        capsys,
        ["sample", "--model", str(ckpt), "--prompt-file", str(bad)],
        names="not UTF-8",
        fix="convert it",
        untouched=[bad],
    )


def test_sample_prompt_file_is_read(capsys, ckpt, tmp_path):
    """The refusals above are of a flag that works: its text is the prompt, echoed before the sample."""
    p = tmp_path / "prompt.txt"
    p.write_text("The king")
    from nanogpt import cli

    assert cli.main(["sample", "--model", str(ckpt), "--prompt-file", str(p), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.startswith("The king")


def test_sample_model_missing(capsys, tmp_path):
    refuse(capsys, ["sample", "--model", str(tmp_path / "run")], names="not found", fix="run folder")


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_sample_model_is_a_file(capsys, ckpt, name):
    refuse(
        capsys,
        ["sample", "--model", str(ckpt / name)],
        names="is a file, not a checkpoint folder",
        fix=f"its folder {ckpt}",
        untouched=[ckpt],
    )


@pytest.mark.parametrize("fmt", ["remote-code", "gpt2"])
def test_sample_hf_export(capsys, exports, fmt):
    hf = exports[fmt]
    refuse(
        capsys,
        ["sample", "--model", str(hf)],
        names="is a Hugging Face export",
        fix=f"nanogpt import --hf {hf} --out RUN",
        untouched=[hf],
    )


def test_sample_truncated_weights(capsys, ckpt, tmp_path):
    bad = variant(ckpt, tmp_path / "trunc", weights=(ckpt / "model.safetensors").read_bytes()[:5000])
    refuse(
        capsys, ["sample", "--model", str(bad)], names="corrupt", fix="another checkpoint", untouched=[bad]
    )


def test_sample_weights_do_not_match_config(capsys, ckpt, tmp_path):
    bad = variant(ckpt, tmp_path / "mismatch", config=config_with(ckpt, d_model=64, d_ff=256))
    refuse(
        capsys,
        ["sample", "--model", str(bad)],
        names="do not match config.json",
        fix="mismatched",
        untouched=[bad],
    )


def test_sample_config_is_a_list(capsys, ckpt, tmp_path):
    bad = variant(ckpt, tmp_path / "list", config=[32, 2, 4])
    refuse(
        capsys,
        ["sample", "--model", str(bad)],
        names="not a nanogpt model config",
        fix="nanogpt train",
        untouched=[bad],
    )


def test_sample_config_with_unknown_keys(capsys, ckpt, tmp_path):
    bad = variant(ckpt, tmp_path / "unknown", config=config_with(ckpt, block_size=16))
    refuse(capsys, ["sample", "--model", str(bad)], names="unknown key 'block_size'", fix="known keys")


def test_sample_config_missing_keys(capsys, ckpt, tmp_path):
    """A config with keys missing takes the defaults: the weights then say the checkpoint is mismatched."""
    bad = variant(ckpt, tmp_path / "missing", config={"d_model": 32, "n_heads": 4})
    refuse(capsys, ["sample", "--model", str(bad)], names="do not match config.json", fix="mismatched")


@pytest.mark.parametrize("field, value", [("d_model", "32"), ("n_layers", None), ("context_length", 16.5)])
def test_sample_config_wrong_types(capsys, ckpt, tmp_path, field, value):
    bad = variant(ckpt, tmp_path / "types", config=config_with(ckpt, **{field: value}))
    refuse(capsys, ["sample", "--model", str(bad)], names=field, fix="config file", untouched=[bad])


# --- eval -----------------------------------------------------------------------------------------------


def test_eval_data_is_a_file(capsys, ckpt, text):
    refuse(
        capsys,
        ["eval", "--model", str(ckpt), "--data", str(text)],
        names="is a file, not a data folder",
        fix="with --text",
        untouched=[text],
    )


def test_eval_data_split_missing(capsys, ckpt, data):
    refuse(
        capsys,
        ["eval", "--model", str(ckpt), "--data", str(data), "--split", "test"],
        names="no 'test' split",
        fix="it has val",
        untouched=[data],
    )


def test_eval_text_is_empty(capsys, ckpt, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    refuse(capsys, ["eval", "--model", str(ckpt), "--text", str(empty)], names="no text", fix="some text")


def test_eval_text_missing(capsys, ckpt, tmp_path):
    refuse(
        capsys,
        ["eval", "--model", str(ckpt), "--text", str(tmp_path / "nope.txt")],
        names="not found",
        fix="existing .txt or .jsonl",
    )


def test_eval_text_is_a_folder(capsys, ckpt, data):
    refuse(
        capsys,
        ["eval", "--model", str(ckpt), "--text", str(data)],
        names="is a folder",
        fix="with --data",
        untouched=[data],
    )


def test_eval_text_jsonl_bad_line(capsys, ckpt, tmp_path):
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    refuse(capsys, ["eval", "--model", str(ckpt), "--text", str(bad)], names="line 2", fix="fix the line")


@pytest.mark.parametrize(
    "flags, names, fix",
    [
        pytest.param(["--stride", "0"], "--stride 0", f"1..{CONTEXT}", id="eval_stride_zero"),
        pytest.param(["--stride", str(CONTEXT + 1)], f"--stride {CONTEXT + 1}", f"1..{CONTEXT}", id="eval_stride_above_context"),
        pytest.param(["--context", str(CONTEXT * 2)], f"--context {CONTEXT * 2}", f"--context in 1..{CONTEXT}", id="eval_context_above_model"),
        pytest.param(["--batch-size", "0"], "--batch-size 0", "at least 1", id="eval_batch_size_zero"),
        pytest.param(["--max-tokens", "1"], "--max-tokens 1", "at least 2", id="eval_max_tokens_one"),
        pytest.param(["--dtype", "int4"], "unknown dtype 'int4'", "fp32, bf16, fp16, int8", id="eval_unknown_dtype"),
    ],
)  # fmt: skip
def test_eval_flag_refused(capsys, ckpt, text, flags, names, fix):
    refuse(capsys, ["eval", "--model", str(ckpt), "--text", str(text), *flags], names=names, fix=fix)


def test_eval_hf_export(capsys, exports, text):
    hf = exports["gpt2"]
    refuse(
        capsys,
        ["eval", "--model", str(hf), "--text", str(text)],
        names="Hugging Face export",
        fix="nanogpt import --hf",
        untouched=[hf],
    )


def test_eval_truncated_weights(capsys, ckpt, text, tmp_path):
    bad = variant(ckpt, tmp_path / "trunc", weights=(ckpt / "model.safetensors").read_bytes()[:-100])
    refuse(
        capsys, ["eval", "--model", str(bad), "--text", str(text)], names="corrupt", fix="another checkpoint"
    )


def test_eval_weights_do_not_match_config(capsys, ckpt, text, tmp_path):
    bad = variant(ckpt, tmp_path / "mismatch", config=config_with(ckpt, n_layers=3))
    refuse(
        capsys,
        ["eval", "--model", str(bad), "--text", str(text)],
        names="is missing 'transformer.blocks.2",
        fix="mismatched",
    )


def test_eval_model_is_a_file(capsys, ckpt, text):
    refuse(
        capsys,
        ["eval", "--model", str(ckpt / "model.safetensors"), "--text", str(text)],
        names="is a file",
        fix="its folder",
    )


# --- bench ----------------------------------------------------------------------------------------------

SERVE_FITS = ["--serve", "--prompt-tokens", "2:8", "--max-tokens", "2:8"]  # 8 + 8 = the context


@pytest.mark.parametrize(
    "flags, names, fix",
    [
        pytest.param(["--repeats", "0"], "--repeats 0", "at least 1", id="bench_repeats_zero"),
        pytest.param(["--batch", "0"], "--batch 0", "at least 1", id="bench_batch_zero"),
        pytest.param(["--seq", "0"], "--seq 0", f"1..{CONTEXT}", id="bench_seq_zero"),
        pytest.param(["--threads", "0"], "--threads 0", "omit it", id="bench_threads_zero"),
        pytest.param(["--backend", "jax"], "invalid choice: 'jax'", "--help", id="bench_unknown_backend"),
        pytest.param(["--backend", "mlx", "--dtype", "bf16"], "fp32 only", "drop --dtype bf16", id="bench_mlx_bf16"),
        pytest.param(["--backend", "mlx", "--compile"], "--compile is torch.compile", "drop --compile", id="bench_mlx_compile"),
        pytest.param(["--serve"], f"exceed the model's context of {CONTEXT}", "lower the upper ends", id="bench_serve_past_context"),
        pytest.param([*SERVE_FITS, "--dtype", "bf16"], "--dtype bf16 with --serve", '--serve-args="--dtype bf16"', id="bench_serve_dtype"),
        pytest.param([*SERVE_FITS, "--compile"], "--compile does not apply to --serve", "drop it", id="bench_serve_compile"),
        pytest.param([*SERVE_FITS, "--batch", "2"], "--batch does not apply to --serve", "drop it", id="bench_serve_batch"),
        pytest.param([*SERVE_FITS, "--concurrency", "1,0"], "every level must be >= 1", "--help", id="bench_serve_concurrency_zero"),
        pytest.param([*SERVE_FITS, "--concurrency", "1,x"], "not a comma-separated list", "--help", id="bench_serve_concurrency_text"),
        pytest.param(["--serve", "--max-tokens", "9:3"], "needs 1 <= LO <= HI", "--help", id="bench_serve_range_backwards"),
        pytest.param([*SERVE_FITS, "--requests-per-client", "0"], "--requests-per-client 0", "at least 1", id="bench_serve_no_requests"),
        pytest.param([*SERVE_FITS, "--serve-args=--port 9"], "--serve-args sets --port", "drop it", id="bench_serve_args_port"),
        pytest.param([*SERVE_FITS, "--serve-args=--dtype 'bf16"], "cannot be split", "check its quotes", id="bench_serve_args_quotes"),
        pytest.param(["--compiled-decode", "--dtype", "int8"], "--compiled-decode compiles the fp32", "--dtype", id="bench_compiled_decode_int8"),
        pytest.param(["--compiled-decode", "--peers"], "--peers does not apply to --compiled-decode", "drop it", id="bench_compiled_decode_peers"),
        pytest.param(["--compiled-decode", "--repeats", "0"], "--repeats 0", "at least 1", id="bench_compiled_decode_repeats_zero"),
    ],
)  # fmt: skip
def test_bench_flag_refused(capsys, ckpt, tmp_path, flags, names, fix):
    out = tmp_path / "out"
    refuse(capsys, ["bench", "--model", str(ckpt), "--out", str(out), *flags], names=names, fix=fix)
    assert not out.exists()  # refused before anything was written


def test_bench_serve_server_that_cannot_start(capsys, ckpt, tmp_path):
    """A server flag the server refuses: after the progress lines, one error line quoting the server's own."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("transformers")
    from nanogpt import cli

    argv = ["bench", "--model", str(ckpt), "--out", str(tmp_path / "out"), "--threads", "1", *SERVE_FITS]
    capsys.readouterr()
    assert cli.main([*argv, "--serve-args=--max-batch 0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if not x.startswith("[bench] ")]
    assert len(lines) == 1 and "exited with code 2" in lines[0] and "check --serve-args" in lines[0], err
    assert "--max-batch 0 must be >= 1" in lines[0]


def test_bench_unknown_preset(capsys):
    refuse(capsys, ["bench", "--preset", "huge"], names="invalid choice: 'huge'", fix="card")


def test_bench_out_is_a_file(capsys, ckpt, text):
    refuse(
        capsys,
        ["bench", "--model", str(ckpt), "--out", str(text), "--repeats", "1"],
        names="is a file",
        fix="pass a folder",
        untouched=[text],
    )


def test_bench_hf_export(capsys, exports):
    refuse(
        capsys, ["bench", "--model", str(exports["remote-code"])], names="Hugging Face", fix="nanogpt import"
    )


# --- serve: the command (a real process, real sockets) -----------------------------------------------------


def serve_argv(ckpt: Path, *flags: str) -> list[str]:
    return ["serve", "--model", str(ckpt), "--threads", "1", *flags]


@pytest.mark.parametrize("port", ["99999", "-1", "65536"])
def test_serve_port_out_of_range(ckpt, port):
    refuse_subprocess(
        serve_argv(ckpt, "--port", port),
        names=f"--port {port} is not a TCP port",
        fix="1..65535",
        untouched=[ckpt],
        timeout=SERVE_TIMEOUT,
    )


def test_serve_port_in_use(ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refuse_subprocess(
            serve_argv(ckpt, "--port", str(port)),
            names=f"port {port} is already in use",
            fix="another --port",
            timeout=SERVE_TIMEOUT,
        )


def test_serve_host_not_on_this_machine(ckpt):
    # 192.0.2.0/24 is TEST-NET-1 (RFC 5737): documentation only, never a local address
    refuse_subprocess(
        serve_argv(ckpt, "--host", "192.0.2.1", "--port", "0"),
        names="192.0.2.1 is not an address of this machine",
        fix="--host 127.0.0.1",
        timeout=SERVE_TIMEOUT,
    )


def test_serve_host_unresolvable(ckpt):
    refuse_subprocess(
        serve_argv(ckpt, "--host", "no-such-host.invalid", "--port", "0"),
        names="'no-such-host.invalid' is not an address",
        fix="pass 127.0.0.1",
        timeout=SERVE_TIMEOUT,
    )


def test_serve_hf_export(exports):
    hf = exports["gpt2"]
    refuse_subprocess(
        ["serve", "--model", str(hf), "--port", "0"],
        names="Hugging Face export",
        fix=f"nanogpt import --hf {hf}",
        untouched=[hf],
        timeout=SERVE_TIMEOUT,
    )


@pytest.mark.parametrize(
    "flags, names, fix",
    [
        pytest.param(["--threads", "0"], "--threads 0", "omit it", id="serve_threads_zero"),
        pytest.param(["--max-batch", "0"], "--max-batch 0", ">= 1", id="serve_max_batch_zero"),
        pytest.param(["--max-queue", "-1"], "--max-queue -1", ">= 0", id="serve_max_queue_negative"),
        pytest.param(["--prefill-chunk", "0"], "--prefill-chunk 0", ">= 1", id="serve_prefill_chunk_zero"),
        pytest.param(["--request-timeout", "-1"], "--request-timeout -1.0", "seconds >= 0", id="serve_request_timeout_negative"),
        pytest.param(["--drain-seconds", "nan"], "--drain-seconds nan", "seconds >= 0", id="serve_drain_seconds_nan"),
        pytest.param(["--max-body-bytes", "0"], "--max-body-bytes 0", ">= 1", id="serve_max_body_bytes_zero"),
        pytest.param(["--api-key-env", "NANOGPT_TEST_UNSET_KEY"], "NANOGPT_TEST_UNSET_KEY", "empty or unset", id="serve_api_key_env_unset"),
    ],
)  # fmt: skip
def test_serve_flag_refused(capsys, ckpt, flags, names, fix):
    # refused before uvicorn is involved: in this process is enough (and fast)
    os.environ.pop("NANOGPT_TEST_UNSET_KEY", None)
    refuse(capsys, ["serve", "--model", str(ckpt), "--port", "0", *flags], names=names, fix=fix)


# --- serve: requests (a real server; each bad field is a 400 that names it) ---------------------------------


@pytest.fixture(scope="module")
def server(ckpt):
    """`nanogpt serve --port 0`: the URL comes from its listening line, printed once the socket is bound."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanogpt", *serve_argv(ckpt, "--port", "0", "--name", "tiny")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first = proc.stderr.readline()  # blocks until the listening line, or the process ends
        m = re.search(r"on (http://127\.0\.0\.1:(\d+))/v1$", first.strip())
        assert m and int(m.group(2)) > 0, f"no listening line: {first!r}"
        # one log line per request follows; drain them so the pipe never fills
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield m.group(1)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_serve_listening_line_names_the_bound_port(server):
    """`--port 0` is any free port: the line printed after the bind names the one the server answers on."""
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        assert json.loads(r.read()) == {"status": "ok"}


NAN, INF = math.nan, math.inf


BOTH = ("/v1/completions", "/v1/chat/completions")
COMPLETIONS = ("/v1/completions",)
CHAT = ("/v1/chat/completions",)
BODIES = {
    "/v1/completions": {"prompt": "Hello", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
}

# (field, value, what the message says, the endpoints that refuse it); the error's param is the field
REQUEST_CASES = [
    ("temperature", NAN, "must be a finite number", BOTH),
    ("temperature", INF, "must be a finite number", BOTH),
    ("temperature", -1, "must be in [0.0, 100.0]", BOTH),
    ("temperature", "hot", "must be a finite number", BOTH),
    ("top_p", NAN, "must be a finite number", BOTH),
    ("top_p", 0, "out of range", BOTH),
    ("top_p", 1.5, "out of range", BOTH),
    ("top_k", -2, "must be >= -1", BOTH),
    ("top_k", 2.5, "must be an integer", BOTH),
    ("top_k", "50", "must be an integer", BOTH),
    ("max_tokens", -1, "out of range", BOTH),
    ("max_tokens", INF, "must be an integer", BOTH),
    ("max_tokens", 1.5, "must be an integer", BOTH),
    ("max_tokens", 10**30, "out of range", BOTH),
    ("max_completion_tokens", -1, "out of range", CHAT),
    ("seed", -1, "out of range", BOTH),
    ("seed", 2**64, "out of range", BOTH),
    ("seed", 1.5, "must be an integer", BOTH),
    ("seed", "7", "must be an integer", BOTH),
    ("logprobs", -1, "out of range", COMPLETIONS),
    ("logprobs", True, "must be an integer", COMPLETIONS),
    ("logprobs", 5, "must be true or false", CHAT),
    ("top_logprobs", 21, "out of range", CHAT),
    ("presence_penalty", 2.5, "out of range", BOTH),
    ("presence_penalty", NAN, "must be a finite number", BOTH),
    ("frequency_penalty", 3, "out of range", BOTH),
    ("repetition_penalty", 1.2, "not supported", BOTH),
    ("logit_bias", {"-1": 5}, "not a token id", BOTH),
    ("logit_bias", {"50257": 5}, "not a token id", BOTH),
    ("logit_bias", {"7": 101}, "[-100, 100]", BOTH),
    ("logit_bias", [1, 2], "must be an object", BOTH),
    ("n", 0, "out of range", BOTH),
    ("n", 17, "out of range", BOTH),
    ("best_of", 2, "not supported", COMPLETIONS),
    ("suffix", "end", "not supported", COMPLETIONS),
    ("stream", "false", "must be true or false", BOTH),
    ("stream_options", {"include_usage": True}, "only allowed when 'stream' is true", BOTH),
    ("echo", "yes", "must be true or false", COMPLETIONS),
    ("echo", True, "not supported", CHAT),
    ("return_tokens_as_token_ids", 1, "must be true or false", BOTH),
    ("model", 7, "must be a string", BOTH),
    ("store", True, "not supported", BOTH),
    ("tools", [{"type": "function", "function": {"name": "f"}}], "not supported", CHAT),
    ("response_format", {"type": "json_object"}, "not supported", CHAT),
    ("reasoning_effort", "low", "not supported", CHAT),
    ("min_p", 0.1, "not supported", BOTH),  # a vLLM extension this server does not read
    ("prompt", "Hi", "not supported", CHAT),
    ("messages", [{"role": "user", "content": "Hi"}], "not supported", COMPLETIONS),
]


@pytest.mark.parametrize(
    "field, value, says, paths",
    REQUEST_CASES,
    ids=[f"serve_request_{f}_{v}"[:40] for f, v, _, _ in REQUEST_CASES],
)
def test_serve_request_field_refused(server, field, value, says, paths):
    for path in paths:
        status, answer = post(server + path, {**BODIES[path], field: value})
        assert status == 400, (path, answer)
        message = answer["error"]["message"]
        assert f"'{field}" in message and says in message, message
        assert answer["error"]["type"] == "invalid_request_error"
        assert answer["error"]["param"] == field, answer


def test_serve_request_content_part_refused(server):
    """A chat message with an image part is refused by its place, not read as text without the image."""
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    content = [{"type": "text", "text": "What is this?"}, image]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 1}
    status, answer = post(server + "/v1/chat/completions", body)
    assert status == 400 and "'image_url' part" in answer["error"]["message"], answer
    assert answer["error"]["param"] == "messages[0].content[1]"


@pytest.mark.parametrize(
    "raw, says",
    [
        pytest.param(b'{"prompt": "Hi", "max_tokens": ' + b"9" * 5000 + b"}", "too long", id="serve_request_5000_digit_number"),
        pytest.param(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "too deep", id="serve_request_deep_nesting"),
        pytest.param(b'{"prompt": "Hi", "max_tokens": 1', "not valid JSON", id="serve_request_truncated_json"),
        pytest.param(b'{"prompt": "\xff"}', "not valid JSON", id="serve_request_not_utf8"),
    ],
)  # fmt: skip
def test_serve_request_body_refused(server, raw, says):
    status, answer = post(server + "/v1/completions", None, raw=raw)
    assert status == 400 and says in answer["error"]["message"], answer


def test_serve_request_prompt_longer_than_context(server):
    status, answer = post(server + "/v1/completions", {"prompt": "to be or not " * CONTEXT, "max_tokens": 1})
    assert status == 400 and f"the model's context is {CONTEXT}" in answer["error"]["message"]
    assert (answer["error"]["param"], answer["error"]["code"]) == ("prompt", "context_length_exceeded")


def test_serve_request_edge_values_accepted(server):
    """The limits themselves are valid: the checks refuse what is out of range, not what is unusual."""
    body = {
        "prompt": "",
        "max_tokens": 2,
        "temperature": 100,
        "top_p": 1e-9,
        "top_k": -1,
        "seed": 2**64 - 1,
        "presence_penalty": -2,
        "frequency_penalty": 2.0,
        "repetition_penalty": 1,
        "logit_bias": {"0": -100, "50256": 100},
        "n": 16,
        "best_of": 1,
        "stream": False,
        "echo": None,
        "user": "someone",
        "store": False,
    }
    status, answer = post(server + "/v1/completions", body)
    assert status == 200, answer
    assert len(answer["choices"]) == 16 and answer["usage"]["completion_tokens"] <= 2 * 16


# --- serve: what a running server answers and logs (a real process with a key and a queue of 2) -------------

GUARD_KEY = "sk-bad-input-test"


@pytest.fixture(scope="module")
def guarded(ckpt, root):
    s = Server(ckpt, root / "guarded.log", key=GUARD_KEY, extra=["--max-queue", "2"])
    yield s
    s.stop()


def bearer(scheme: str = "Bearer", key: str = GUARD_KEY) -> dict[str, str]:
    return {"Authorization": f"{scheme} {key}"}


@pytest.mark.parametrize(
    "path, body, fits, message",
    [
        pytest.param("/v1/completions", {"prompt": "Hi", "n": 3}, {"n": 2}, "'n'=3 exceeds this server's queue of 2", id="completions"),
        pytest.param("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 3}, {"n": 2}, "'n'=3 exceeds", id="chat"),
        pytest.param("/v1/completions", {"prompt": ["a", "b"], "n": 2}, {"n": 1}, "2 prompts x 'n'=2 = 4 choices exceed", id="prompts"),
    ],
)  # fmt: skip
def test_serve_n_larger_than_the_queue_is_a_400(guarded, path, body, fits, message):
    """More choices than the whole queue holds can never be queued: a 400 saying so, not a 429 (retry later)."""
    status, answer = post(guarded.url + path, {**body, "max_tokens": 1}, bearer())
    assert status == 400, answer
    error = answer["error"]
    assert message in error["message"] and "restart the server with a larger --max-queue" in error["message"]
    assert (error["param"], error["type"]) == ("n", "invalid_request_error")
    status, answer = post(guarded.url + path, {**body, **fits, "max_tokens": 1}, bearer())
    assert status == 200, answer  # as many as the queue holds fit


def test_serve_client_hanging_up_mid_body_is_a_disconnect(guarded):
    """A body cut short (Content-Length not reached, or a chunked body never ended) is a client that left:
    logged and counted as 499, with no traceback, not as a 500."""
    before = guarded.log.read_text()
    heads = {
        "short": b'Content-Length: 200\r\n\r\n{"prompt": "Hi",',
        "chunked": b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"prompt": "Hi",\r\n',  # 0x10 bytes, no end
    }
    for head in heads.values():
        with socket.create_connection(("127.0.0.1", guarded.port), timeout=30) as s:
            s.sendall(
                f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {GUARD_KEY}\r\n"
                "Content-Type: application/json\r\n".encode()
                + head
            )

    def new_lines() -> list[str]:
        return guarded.log.read_text()[len(before) :].splitlines()

    assert wait_for(lambda: sum(" 499 " in line for line in new_lines()) == 2), new_lines()
    assert "Traceback" not in guarded.log.read_text() and not any(" 500 " in line for line in new_lines())
    with urllib.request.urlopen(guarded.url + "/metrics", timeout=30) as r:
        metrics = r.read().decode()
    assert re.search(r'nanogpt_requests_total\{path="/v1/completions",status="499"\} [1-9]', metrics)
    assert 'status="500"' not in metrics


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_serve_authorization_scheme_is_case_insensitive(guarded, scheme):
    """RFC 7235: the scheme of `Authorization` is case-insensitive; the key itself is not."""
    body = {"prompt": "Hi", "max_tokens": 1}
    status, answer = post(guarded.url + "/v1/completions", body, bearer(scheme))
    assert status == 200, answer
    for wrong in (bearer(scheme, GUARD_KEY.upper()), bearer("Basic"), {"Authorization": GUARD_KEY}):
        status, answer = post(guarded.url + "/v1/completions", body, wrong)
        assert status == 401 and answer["error"]["code"] == "invalid_api_key", (wrong, answer)


def test_serve_non_loopback_host_without_a_key_warns(ckpt):
    """Reachable from other machines with no key: one warning line at start, before the socket listens."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nanogpt", *serve_argv(ckpt, "--host", "0.0.0.0", "--port", "0")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        first = proc.stderr.readline()  # printed right after the bind, before the model loads
    finally:
        proc.kill()
        proc.wait(timeout=30)
    for says in (
        "warning",
        "--host 0.0.0.0 without an API key",
        "anyone who can reach",
        "--api-key-env NAME",
    ):
        assert says in first, first


def test_serve_sigterm_on_an_idle_server_ends_quietly(ckpt, tmp_path):
    """SIGTERM, once or twice (a second signal stops at once): exit 0, no traceback, no CancelledError.

    A second signal 0.1 s after the first lands in uvicorn's shutdown (which it used to cut short, leaving
    the lifespan task to be cancelled: a CancelledError traceback); 0.4 s after, in the process's teardown
    (where the default handler used to end it with -SIGTERM).
    """
    for i, gap in enumerate((None, 0.1, 0.4)):
        log = tmp_path / f"serve{i}.log"
        server = Server(ckpt, log)
        server.proc.send_signal(signal.SIGTERM)
        if gap is not None:
            time.sleep(gap)
            server.proc.send_signal(signal.SIGTERM)  # a no-op if it already exited
        rc = server.proc.wait(timeout=60)
        text = log.read_text()
        assert rc == 0 and "Traceback" not in text and "CancelledError" not in text, text
        assert text.splitlines()[-1] == "nanogpt serve: stopped; requests cancelled at shutdown: 0", text
