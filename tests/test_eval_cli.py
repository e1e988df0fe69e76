"""`python -m r1vl.eval`: input mistakes fail early with one clear line, --out is safe,
and the run's config supplies the evaluation settings the trainer used."""
import json
import os
import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import r1vl.eval as ev
from r1vl.config import dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """runs/X/final (a tiny saved model) next to runs/X/config.yaml, as r1vl.train lays them out."""
    from r1vl.models import build_tiny, synthetic_corpus

    run = tmp_path_factory.mktemp("run")
    build_tiny(synthetic_corpus(30), vocab_size=400, out_dir=run / "final", hidden_size=64,
               intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
               vision_depth=1, vision_embed_dim=32, vision_num_heads=1)
    dump_config(load_config(None, ["rollout.max_completion_length=3", "data.min_pixels=1024",
                                   "data.max_pixels=4096", "algorithm.alpha=0.25"]), run / "config.yaml")
    return run


@pytest.fixture
def fake_model(tmp_path):
    """A directory that passes the CLI's up-front checks; nothing may load it."""
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text("{}")
    return m


@pytest.fixture
def no_eval(monkeypatch):
    """Fail the test if the CLI gets as far as loading data, a model, or evaluating."""
    import r1vl.data
    import r1vl.models

    def boom(*a, **k):
        raise AssertionError("the CLI went on past its input checks")

    monkeypatch.setattr(r1vl.data, "load_dataset", boom)
    monkeypatch.setattr(r1vl.models, "load_pretrained", boom)
    monkeypatch.setattr(ev, "evaluate", boom)


def _err_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error line on stderr"
    return err[-1]


# --------------------------------------------------------------------------- 1. --out


def test_out_parent_directory_is_created(tiny_run, data_dir, tmp_path, capsys):
    out = tmp_path / "new" / "nested" / "eval.json"
    capsys.readouterr()
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "2",
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n"] == 2 and "accuracy" in res
    assert '"n": 2' in capsys.readouterr().out


def test_stdout_is_the_result_alone(tiny_run, data_dir, monkeypatch, capfd):
    """What libraries write to file descriptor 1 while the evaluation runs (torch 2.8's gloo
    prints "[Gloo] Rank 0 is connected to 1 peer ranks ..." there when the process group starts)
    goes to stderr: stdout parses as the one JSON object a caller pipes on."""
    import ctypes
    import os

    libc = ctypes.CDLL(None)
    real = ev.evaluate

    def noisy(*args, **kwargs):
        os.write(1, b"[fd 1] a library's note\n")
        libc.printf(b"[printf] a C library's note, in C stdio's buffer\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", noisy)
    capfd.readouterr()
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "2"]) == 0
    out, err = capfd.readouterr()
    assert json.loads(out)["n"] == 2, out
    assert "[fd 1] a library's note" in err and "[printf] a C library's note" in err, err[-2000:]


def test_out_parent_cannot_be_created_fails_before_evaluating(fake_model, data_dir, tmp_path, capsys, no_eval):
    blocker = tmp_path / "afile"
    blocker.write_text("")
    out = blocker / "sub" / "eval.json"  # parent would have to be created under a file
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert line.startswith("r1vl.eval: error: --out ") and "cannot create" in line


def test_out_existing_directory_fails_before_evaluating(fake_model, data_dir, tmp_path, capsys, no_eval):
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--out", str(tmp_path)]) == 2
    line = _err_line(capsys)
    assert line.startswith("r1vl.eval: error: --out ") and "is a directory" in line


def test_outputs_file_has_every_sample_in_data_order(tiny_run, data_dir, tmp_path, capsys):
    from r1vl.data import load_dataset

    outputs = tmp_path / "o" / "outputs.jsonl"
    capsys.readouterr()
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "5", "--batch-size", "2",
                    "--outputs", str(outputs)]) == 0
    res = json.loads(capsys.readouterr().out)
    recs = [json.loads(x) for x in outputs.read_text().splitlines()]
    samples = list(load_dataset(str(data_dir / "test.jsonl")))[:5]
    assert [r["index"] for r in recs] == list(range(5)) and res["outputs"] == str(outputs)
    assert [r["problem"] for r in recs] == [x.problem for x in samples]
    assert [r["solution"] for r in recs] == [x.solution for x in samples]
    assert [r["source"] for r in recs] == [x.source for x in samples]  # file:row: joins a record to its row
    assert all(isinstance(r["completion"], str) and r["completion_length"] >= 1 for r in recs)
    # the per-sample scores are the ones the printed means come from
    for key, rk in (("accuracy", "correct"), ("step_rar", "step_rar"), ("step_rvr", "step_rvr")):
        assert res[key] == pytest.approx(sum(r[rk] for r in recs) / 5), key
    # scoring the saved completions again gives the saved scores
    again = ev.score([r["completion"] for r in recs], samples, alpha=0.25)
    assert again["correct"] == [r["correct"] for r in recs] and again["accuracy"] == [r["step_rar"] for r in recs]


def test_windows_is_refused_before_evaluating(fake_model, data_dir, capsys, monkeypatch, no_eval):
    """The reward workers need pipe descriptors and signal timers: on Windows the evaluation would
    decode every item, then fail scoring the first; it stops at once with one line instead."""
    monkeypatch.setattr(sys, "platform", "win32")
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir)]) == 2
    line = _err_line(capsys)
    assert line.startswith("r1vl.eval: error: rewards cannot be scored on win32") and "Linux or macOS" in line


def test_a_math_verify_older_than_0_8_is_refused_before_evaluating(fake_model, data_dir, tmp_path, capsys,
                                                                   monkeypatch, no_eval):
    """math-verify 0.7 scored every answer it was needed for as wrong, silently: the eval CLI
    refuses it in one line, before it loads anything or writes --out."""
    from importlib import metadata

    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "0.7.0" if name == "math-verify" else real(name))
    out = tmp_path / "res.json"
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--out", str(out)]) == 2
    line = _err_line(capsys)
    assert line.startswith("r1vl.eval: error: math-verify 0.7.0 is installed, and r1vl needs 0.8 or newer"), line
    assert "pip install 'math-verify>=0.8,<0.10'" in line and not out.exists()


def test_outputs_and_out_must_differ_and_be_files(fake_model, data_dir, tmp_path, capsys, no_eval):
    f = tmp_path / "same.json"
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--out", str(f), "--outputs", str(f)]) == 2
    assert "name the same file" in _err_line(capsys)
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--outputs", str(tmp_path)]) == 2
    line = _err_line(capsys)
    assert line.startswith("r1vl.eval: error: --outputs ") and "is a directory" in line


# --------------------------------------------------------------------------- 2. --n and other numbers


@pytest.mark.parametrize("flag,value,expect", [("--limit", "-3", ">= 0"), ("--n", "abc", "integer"),
                                               ("--max-new-tokens", "0", ">= 1"),
                                               ("--batch-size", "-1", ">= 1"),
                                               ("--min-pixels", "0", ">= 1"), ("--alpha", "-0.5", ">= 0"),
                                               # inf made the JSON's reward NaN
                                               ("--accuracy-weight", "inf", "finite"),
                                               ("--validity-weight", "nan", "finite"), ("--alpha", "inf", "finite"),
                                               ("--reward-timeout-s", "0", "> 0"),
                                               ("--reward-timeout-s", "inf", "finite")])
def test_bad_numbers_are_argparse_errors(flag, value, expect, fake_model, data_dir, capsys, no_eval):
    with pytest.raises(SystemExit) as e:
        ev.main(["--model", str(fake_model), "--data", str(data_dir), flag, value])
    assert e.value.code == 2
    line = _err_line(capsys)
    name = "--limit/--n" if flag in ("--limit", "--n") else flag
    assert f"argument {name}" in line and expect in line


def test_n_zero_means_all_is_accepted(fake_model, data_dir, capsys, monkeypatch):
    """--n 0 (documented: all) passes the parser; evaluation is stubbed out."""
    import r1vl.models

    def stop(path, **kw):
        raise r1vl.models.ModelLoadError(f"model.path {str(path)!r}: stopped by the test")

    monkeypatch.setattr(r1vl.models, "load_pretrained", stop)
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--n", "0"]) == 2
    assert "stopped by the test" in _err_line(capsys)


def test_ctrl_c_is_one_line(fake_model, data_dir, capsys, monkeypatch):
    import r1vl.models

    def interrupted(path, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(r1vl.models, "load_pretrained", interrupted)
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "r1vl.eval: interrupted (Ctrl-C): no result" and "Traceback" not in err


def test_sigterm_is_one_line_exit_143_and_the_handler_is_put_back(fake_model, data_dir, capsys, monkeypatch):
    """SIGTERM (a scheduler's preemption, torchrun stopping the other ranks) stops the CLI as Ctrl-C
    does, through its cleanup (the vLLM engine's temporary folder: tests/vllm_suite), with one
    line and 128 + 15; it killed the process outright before, the folder left in /tmp."""
    import signal
    import time

    import r1vl.models

    def terminated(path, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # (the handler raises here)
        pytest.fail("SIGTERM did not stop the evaluation")

    monkeypatch.setattr(r1vl.models, "load_pretrained", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir)]) == 143
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "r1vl.eval: stopped (SIGTERM): no result" and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- 3. --model wording


def test_model_without_config_json_names_the_flag(tmp_path, data_dir, capsys, no_eval):
    assert ev.main(["--model", str(tmp_path), "--data", str(data_dir)]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"r1vl.eval: error: --model {tmp_path}: ") and "model.path" not in line
    assert "config.json" in line


def test_model_naming_a_file_or_nothing_names_the_flag(tmp_path, data_dir, capsys, no_eval):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert ev.main(["--model", str(f), "--data", str(data_dir)]) == 2
    assert _err_line(capsys) == (f"r1vl.eval: error: --model {f}: is a file, not a model directory "
                                 "(such as runs/<run>/final)")
    assert ev.main(["--model", "org/name", "--data", str(data_dir)]) == 2  # no hub id here
    assert _err_line(capsys) == "r1vl.eval: error: --model org/name: no such directory"


def test_model_load_failure_names_the_flag(fake_model, data_dir, capsys):
    """A config.json that transformers cannot load: load_pretrained's model.path message is re-worded."""
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--n", "1"]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"r1vl.eval: error: --model {fake_model}: ") and "model.path" not in line


def test_missing_processor_file_is_found_before_the_weights_load(tiny_run, data_dir, tmp_path, capsys, monkeypatch):
    """A checkpoint without its image-processor file fails on that file, before the model's
    weights are read (minutes for a 7B model)."""
    import shutil

    import transformers

    model = tmp_path / "final"
    shutil.copytree(tiny_run / "final", model)
    (model / "preprocessor_config.json").unlink()

    def no_weights(*a, **k):
        raise AssertionError("the weights were loaded before the processor")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", no_weights)
    assert ev.main(["--model", str(model), "--data", str(data_dir), "--n", "1"]) == 2
    assert _err_line(capsys).startswith(f"r1vl.eval: error: --model {model}: cannot load (")


def test_model_error_rewording_keeps_library_message():
    from r1vl.models import ModelLoadError

    e = ModelLoadError("model.path '/tmp/m': cannot load (bad weights)")
    assert ev._model_error("/tmp/m", e) == "--model /tmp/m: cannot load (bad weights)"
    assert ev._model_error("/tmp/m", ValueError("other")) == "--model /tmp/m: other"


def test_cli_model_error_has_no_traceback(tmp_path):
    d = tmp_path / "data.jsonl"
    d.write_text("")
    r = subprocess.run([sys.executable, "-m", "r1vl.eval", "--model", str(tmp_path), "--data", str(d)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and f"--model {tmp_path}:" in r.stderr and "model.path" not in r.stderr


# --------------------------------------------------------------------------- 4. the run's settings


def _run_cfg(**over):
    return load_config(None, [f"{k}={v}" for k, v in over.items()])


def test_resolve_settings_uses_run_config():
    cfg = _run_cfg(**{"rollout.max_completion_length": 40, "data.min_pixels": 1024, "data.max_pixels": 8192,
                      "algorithm.alpha": 0.3, "algorithm.accuracy_variant": "official",
                      "algorithm.accuracy_weight": 2.0, "algorithm.validity_weight": 0.0,
                      "algorithm.reward_timeout_s": 7.5})
    explicit = dict.fromkeys(ev.EVAL_SETTINGS)
    values, sources = ev.resolve_settings(explicit, cfg, "runs/x/config.yaml")
    assert values == {"max_new_tokens": 40, "min_pixels": 1024, "max_pixels": 8192, "alpha": 0.3,
                      "variant": "official", "accuracy_weight": 2.0, "validity_weight": 0.0,
                      "reward_timeout_s": 7.5, "skip_bad_rows": False}
    assert sources["max_new_tokens"] == "runs/x/config.yaml: rollout.max_completion_length"
    assert sources["max_pixels"] == "runs/x/config.yaml: data.max_pixels"


def test_resolve_settings_explicit_flags_win():
    cfg = _run_cfg(**{"rollout.max_completion_length": 40, "data.min_pixels": 1024, "data.max_pixels": 8192})
    explicit = dict.fromkeys(ev.EVAL_SETTINGS)
    explicit.update(max_new_tokens=7, max_pixels=2048, variant="paper")
    values, sources = ev.resolve_settings(explicit, cfg, "c.yaml")
    assert values["max_new_tokens"] == 7 and sources["max_new_tokens"] == "--max-new-tokens"
    assert values["max_pixels"] == 2048 and sources["max_pixels"] == "--max-pixels"
    assert values["min_pixels"] == 1024 and sources["min_pixels"] == "c.yaml: data.min_pixels"
    assert values["variant"] == "paper" and sources["variant"] == "--variant"


def test_resolve_settings_without_run_config_keeps_builtin_defaults():
    values, sources = ev.resolve_settings(dict.fromkeys(ev.EVAL_SETTINGS), None)
    assert values == {k: d for k, (d, _) in ev.EVAL_SETTINGS.items()}
    assert values["max_new_tokens"] == 96 and values["min_pixels"] == 56 * 56 and values["max_pixels"] == 112 * 112
    assert set(sources.values()) == {"built-in default"}


def test_resolve_settings_mixed_pixel_bounds_conflict_is_clear():
    cfg = _run_cfg(**{"data.min_pixels": 1024, "data.max_pixels": 4096})
    explicit = dict.fromkeys(ev.EVAL_SETTINGS)
    explicit["min_pixels"] = 5000
    with pytest.raises(ValueError, match=r"--min-pixels 5000 \(from --min-pixels\) exceeds --max-pixels 4096 "
                                         r"\(from c.yaml: data.max_pixels\)"):
        ev.resolve_settings(explicit, cfg, "c.yaml")


def test_find_run_config_layouts(tmp_path):
    run = tmp_path / "run"
    for sub in ("final", "warmup", "checkpoints/grpo-3"):
        (run / sub).mkdir(parents=True)
    (tmp_path / "lone").mkdir()
    dump_config(_run_cfg(), run / "config.yaml")
    assert ev.find_run_config(run / "final") == (run / "config.yaml").resolve()
    assert ev.find_run_config(run / "warmup") == (run / "config.yaml").resolve()
    assert ev.find_run_config(run / "checkpoints" / "grpo-3") == (run / "config.yaml").resolve()
    assert ev.find_run_config(tmp_path / "lone") is None
    (tmp_path / "lone" / "best").symlink_to(run / "final")  # a link to the run's model: the run's settings
    assert ev.find_run_config(tmp_path / "lone" / "best") == (run / "config.yaml").resolve()
    elsewhere = tmp_path / "store" / "model"  # the run's final/ a link to weights kept elsewhere
    elsewhere.parent.mkdir()
    (run / "final").rename(elsewhere)
    (run / "final").symlink_to(elsewhere)
    assert ev.find_run_config(run / "final") == (run / "config.yaml").absolute()


def test_a_checkpoint_is_evaluated_with_the_settings_it_was_written_under(tmp_path, data_dir):
    """r1vl.eval on runs/X/checkpoints/<name> read runs/X/config.yaml: after a resume that changed
    an evaluation setting (allowed: rollout.max_completion_length), an older checkpoint was
    evaluated with the new one, and a checkpoint copied out of its run with the built-in defaults.
    Each checkpoint carries its config.yaml, which the CLI reads first."""
    import shutil

    from r1vl.train import main
    from test_train import FAST

    out = tmp_path / "run"
    common = [f"output_dir={out}", f"data.synthetic_dir={data_dir}", *FAST, "train.save_every=1",
              "train.keep_checkpoints=0", "train.eval_before=false", "train.eval_after=false", "logging.plot=false"]
    assert main([*common, "train.max_steps=1", "rollout.max_completion_length=7"]) == 0
    assert main([*common, "train.max_steps=2", "rollout.max_completion_length=9", "train.resume=true"]) == 0
    ck = out / "checkpoints"

    def max_new_tokens(model):
        path = ev.find_run_config(model)
        settings, sources = ev.resolve_settings(dict.fromkeys(ev.EVAL_SETTINGS), ev.load_run_config(path), path)
        return settings["max_new_tokens"], path

    assert max_new_tokens(ck / "grpo-000001") == (7, (ck / "grpo-000001" / "config.yaml").resolve())
    assert max_new_tokens(ck / "grpo-000002")[0] == 9 and max_new_tokens(out / "final")[0] == 9
    shutil.copytree(ck / "grpo-000001", tmp_path / "kept")  # a checkpoint copied out of its run
    assert max_new_tokens(tmp_path / "kept")[0] == 7


def test_foreign_config_yaml_is_warned_and_ignored(tmp_path, caplog):
    p = tmp_path / "config.yaml"
    p.write_text("not_an_r1vl_key: 1\n")
    with caplog.at_level(logging.WARNING, logger="r1vl.eval"):
        assert ev.load_run_config(p) is None
    assert str(p) in caplog.text and "built-in defaults" in caplog.text


def test_cli_uses_run_config_and_logs_sources(tiny_run, data_dir, monkeypatch, caplog, capsys):
    """End to end with the settings captured (no generation): run values, then an explicit flag."""
    import r1vl.models

    seen = {}
    real_load = r1vl.models.load_pretrained

    def spy_load(path, **kw):
        seen["load_pixels"] = (kw["min_pixels"], kw["max_pixels"])
        return real_load(path, **kw)

    def fake_evaluate(engine, processor, samples, **kw):
        seen.update(kw)
        return {"n": len(samples), "accuracy": 0.0, "correct_items": [0.0] * len(samples)}

    monkeypatch.setattr(r1vl.models, "load_pretrained", spy_load)
    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    with caplog.at_level(logging.INFO, logger="r1vl.eval"):
        assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "1"]) == 0
    assert seen["max_new_tokens"] == 3 and seen["alpha"] == 0.25 and seen["variant"] == "paper"
    assert seen["load_pixels"] == (1024, 4096)
    assert "rollout.max_completion_length" in caplog.text and "config.yaml" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="r1vl.eval"):
        assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "1",
                        "--max-new-tokens", "9"]) == 0
    assert seen["max_new_tokens"] == 9 and "max_new_tokens = 9 (--max-new-tokens)" in caplog.text
    # the result says which settings it was made with, and from where (it said so on stderr only)
    first, second = _json_objects(capsys.readouterr().out)
    assert first["settings"]["max_new_tokens"] == {"value": 3, "from": f"{tiny_run / 'config.yaml'}: "
                                                                          "rollout.max_completion_length"}
    assert second["settings"]["max_new_tokens"] == {"value": 9, "from": "--max-new-tokens"}
    assert second["settings"]["alpha"]["value"] == 0.25 and set(second["settings"]) == set(ev.EVAL_SETTINGS)


def _json_objects(text: str) -> list:
    """The JSON objects printed one after another (the CLI's stdout over several calls)."""
    dec, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        obj, i = dec.raw_decode(text, i)
        out.append(obj)
    return out


def test_make_prompt_templates():
    """data.prompt_template: "r1vl" wraps the problem in the authors' evaluation instruction;
    "verbatim" sends the problem alone, as the authors' RL code does."""
    from types import SimpleNamespace

    from r1vl.data import format_prompt
    from r1vl.eval import make_prompt

    class Proc:
        def chat_prompt(self, user, with_image):
            return f"<{'img' if with_image else 'txt'}>{user}"

    s = SimpleNamespace(problem="How many circles?", image=object())
    wrapped = make_prompt(Proc(), s)
    assert wrapped.text == "<img>" + format_prompt(s.problem) and "### Rationales" in wrapped.text
    assert make_prompt(Proc(), s, "verbatim").text == "<img>How many circles?"
    assert make_prompt(Proc(), SimpleNamespace(problem="Q", image=None), "verbatim").text == "<txt>Q"
    with pytest.raises(ValueError, match="verbatim"):
        make_prompt(Proc(), s, "plain")


def test_evaluate_logs_bounded_progress_on_rank0_only(monkeypatch, caplog):
    """evaluate logs "eval: k/N samples, T s" per batch on the main rank, at most 10 lines
    (first and last batch included); other ranks log nothing and every rank makes the
    same collective calls."""
    from types import SimpleNamespace

    import r1vl.utils
    from r1vl.rollout.base import Completion
    from r1vl.utils import Dist

    class Proc:
        def chat_prompt(self, user, with_image):
            return user

    class Engine:
        def generate(self, prompts, n, sampling):
            return [Completion(i, [1, 2], "### The final answer is: 7", "stop") for i in range(len(prompts))]

    samples = [SimpleNamespace(problem=f"Q{i}", solution="### Step 1: 4 + 3 = 7\n### The final answer is: 7",
                               key_steps=[["4 + 3 = 7"]], image=None, meta={}) for i in range(46)]
    calls = []
    monkeypatch.setattr(r1vl.utils, "all_reduce_sum", lambda v, d: calls.append("reduce") or list(v))
    monkeypatch.setattr(r1vl.utils, "all_gather_objects", lambda o, d: calls.append("gather") or [o] * d.world)

    def run(d):
        caplog.clear()
        calls.clear()
        with caplog.at_level(logging.INFO, logger="r1vl.eval"):
            ev.evaluate(Engine(), Proc(), samples, max_new_tokens=4, batch_size=1, d=d)
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval: ")], list(calls)

    lines, coll1 = run(Dist())
    assert 2 <= len(lines) <= 10, lines
    assert lines[0].startswith("eval: 1/46 samples, ") and lines[0].endswith(" s")
    assert lines[-1].startswith("eval: 46/46 samples, ")
    lines, coll0 = run(Dist(rank=0, world=2))  # 23 batches of rank 0's shard: counts x 2
    assert lines[0].startswith("eval: 2/46 ") and lines[-1].startswith("eval: 46/46 ") and len(lines) <= 10
    lines, coll_other = run(Dist(rank=1, world=2))
    assert lines == [] and coll_other == coll0 == coll1


def test_evaluate_reward_is_weighted_as_in_training():
    """The held-out `reward` (and summary.json's reward_*) is accuracy_weight * StepRAR +
    validity_weight * StepRVR, as the StepGRPO steps' reward: not always 1 * StepRAR + 1 * StepRVR."""
    from types import SimpleNamespace

    from r1vl.rollout.base import Completion

    class Proc:
        def chat_prompt(self, user, with_image):
            return user

    class Engine:
        def generate(self, prompts, n, sampling):  # right answer, one of two key steps, no format
            return [Completion(i, [1], "### Step 1: 4 + 3 = 7\n### The final answer is: 7", "stop")
                    for i in range(len(prompts))]

    samples = [SimpleNamespace(problem="Q", solution="### The final answer is: 7", image=None, meta={},
                               key_steps=[["4 + 3 = 7"], ["3 + 4 = 7"]])] * 3
    plain = ev.evaluate(Engine(), Proc(), samples, max_new_tokens=4)
    assert (plain["step_rar"], plain["step_rvr"], plain["reward"]) == pytest.approx((1.05, 0.0, 1.05))
    weighted = ev.evaluate(Engine(), Proc(), samples, max_new_tokens=4, accuracy_weight=2.0, validity_weight=0.5)
    assert weighted["reward"] == pytest.approx(2.1) and weighted["step_rar"] == pytest.approx(1.05)


# --------------------------------------------------------------------------- devices, torchrun


def test_device_cuda_without_a_gpu_is_one_line(fake_model, data_dir, capsys, no_eval, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device" in _err_line(capsys)


def test_auto_device_and_dtype(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ev._device_and_dtype("auto", "auto") == (False, "float32")
    assert ev._device_and_dtype("cpu", "bfloat16") == (False, "bfloat16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert ev._device_and_dtype("auto", "auto") == (True, "bfloat16")
    assert ev._device_and_dtype("cpu", "auto") == (False, "float32")
    # a run's compute dtype, as its own evaluation decoded; bfloat16 only where the device has it
    assert ev._device_and_dtype("auto", "auto", "float32") == (True, "float32")
    assert ev._device_and_dtype("cpu", "auto", "bfloat16") == (False, "bfloat16")
    assert ev._device_and_dtype("auto", "float16", "bfloat16") == (True, "float16")  # the flag wins
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert ev._device_and_dtype("auto", "auto", "bfloat16") == (True, "float32")


@pytest.mark.slow
def test_torchrun_two_ranks_give_the_single_process_result(tiny_run, data_dir, tmp_path):
    """`torchrun --nproc-per-node 2 -m r1vl.eval`: each rank evaluates half the items, rank 0
    alone prints and writes; greedy, one item per batch (no padding), so every completion and
    number equals one process's."""
    from ports import free_port

    def run(prefix, tag):
        outputs = tmp_path / f"{tag}.jsonl"
        r = subprocess.run([*prefix, "-m", "r1vl.eval", "--model", str(tiny_run / "final"), "--data", str(data_dir),
                            "--limit", "5", "--batch-size", "1", "--outputs", str(outputs)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout), outputs.read_text(), r.stderr

    one, one_out, _ = run([sys.executable], "one")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    two, two_out, err = run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port())], "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    for k in ("n", "accuracy", "step_rar", "step_rvr", "reward", "completion_length"):
        assert two[k] == one[k], k
    assert two_out == one_out
    assert err.count("device = cpu") == 1  # rank 0's notes only
    # more ranks than items: rank 1 has none and still joins the reductions
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "r1vl.eval",
                        "--model", str(tiny_run / "final"), "--data", str(data_dir), "--limit", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["n"] == 1


@pytest.mark.cuda
def test_eval_runs_on_the_gpu(tiny_run, data_dir, capsys, monkeypatch):
    seen = {}
    real = ev.evaluate

    def spy(engine, *a, **k):
        p = next(engine.model.parameters())
        seen["device"], seen["dtype"] = p.device.type, p.dtype
        return real(engine, *a, **k)

    monkeypatch.setattr(ev, "evaluate", spy)
    capsys.readouterr()
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--limit", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    import torch

    assert seen == {"device": "cuda", "dtype": torch.bfloat16} and res["device"] == "cuda"


def test_engine_vllm_without_vllm_is_one_line(fake_model, data_dir, capsys, no_eval, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--engine", "vllm"]) == 2
    assert "--engine vllm: vLLM is not installed" in _err_line(capsys)


# --------------------------------------------------------------------------- audit: outputs, timeouts, ranks


@pytest.fixture
def own_data(data_dir, tmp_path):
    """A copy of the synthetic task that a test may point an output at (data_dir is shared)."""
    import shutil

    d = tmp_path / "d"
    shutil.copytree(data_dir, d)
    return d


def test_outputs_or_out_naming_the_data_file_is_refused(fake_model, own_data, tmp_path, capsys, monkeypatch, no_eval):
    """--outputs ow/test.jsonl with --data ow replaced the data set with 3 output rows: every
    spelling of the file read (the directory's test.jsonl, a relative path, a symbolic or hard
    link) is refused at start, and the data stays as it was."""
    import os

    data = own_data / "test.jsonl"
    before = data.read_bytes()
    (tmp_path / "sym.jsonl").symlink_to(data)
    os.link(data, tmp_path / "hard.jsonl")
    monkeypatch.chdir(tmp_path)
    cases = [(["--data", str(own_data)], "--outputs", str(data)),
             (["--data", str(data)], "--out", "d/test.jsonl"),
             (["--data", str(own_data)], "--outputs", "sym.jsonl"),
             (["--data", "d/test.jsonl"], "--out", "hard.jsonl")]
    for data_args, flag, out in cases:
        assert ev.main(["--model", str(fake_model), *data_args, flag, out]) == 2, (data_args, flag, out)
        line = _err_line(capsys)
        assert line.startswith(f"r1vl.eval: error: {flag} {out}: ") and "--data" in line and "overwrite" in line, line
    # a datasets directory: the files inside it are what is read
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "dataset_info.json").write_text("{}")
    assert ev.main(["--model", str(fake_model), "--data", str(hf), "--outputs", str(hf / "data-00000.arrow")]) == 2
    assert "--data" in _err_line(capsys)
    assert data.read_bytes() == before and (tmp_path / "hard.jsonl").read_bytes() == before


def test_outputs_or_out_naming_a_model_file_is_refused(tmp_path, data_dir, capsys, monkeypatch, no_eval):
    """--out final/config.json wrote the result over the evaluated model's config (the next load
    failed), --outputs over its weights or the run's config.yaml: a file of the --model directory
    (weights, configs, tokenizer, processor, a subdirectory's), under any spelling or link, or the
    run's config is refused at start and nothing changes; a new file beside them is written."""
    run = tmp_path / "run"
    model = run / "final"
    (model / "global_step3").mkdir(parents=True)
    files = {"config.json": "{}", "model.safetensors": "w", "tokenizer.json": "t", "preprocessor_config.json": "p",
             "trainer_state.pt": "s", "global_step3/mp_rank_00_model_states.pt": "d", "../config.yaml": "c"}
    for name, text in files.items():
        (model / name).write_text(text)
    (tmp_path / "link").symlink_to(model)
    monkeypatch.chdir(tmp_path)
    data = str(data_dir / "test.jsonl")
    cases = [("--out", "run/final/config.json"), ("--outputs", str(model / "model.safetensors")),
             ("--out", "link/tokenizer.json"), ("--outputs", "run/final/preprocessor_config.json"),
             ("--out", "run/final/trainer_state.pt"), ("--out", "run/final/global_step3/new.json"),
             ("--outputs", "run/final/model-00001-of-00002.safetensors"), ("--out", "run/config.yaml"),
             # the same files on a case-insensitive disk (macOS's, Windows')
             ("--out", "run/final/Config.json"), ("--outputs", "run/final/Model.SafeTensors"),
             ("--out", "run/final/Tokenizer.json"), ("--out", "run/Config.yaml"), ("--out", "RUN/FINAL/config.json"),
             ("--outputs", "Run/Final/Global_Step3/x.json")]
    for flag, out in cases:
        assert ev.main(["--model", "run/final", "--data", data, flag, out]) == 2, (flag, out)
        line = _err_line(capsys)
        assert line.startswith(f"r1vl.eval: error: {flag} {out}: ") and "overwrite" in line, line
        assert ("run's config" in line) if out.endswith("yaml") else ("--model run/final" in line), line
    assert {n: (model / n).read_text() for n in files} == files
    assert not (model / "model-00001-of-00002.safetensors").exists()
    assert not (model / "global_step3" / "new.json").exists()
    # a Hugging Face cache snapshot: the model's files are links into ../../blobs, and the result
    # would replace the link (the file the path names), not the blob
    blobs, snap = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (blobs / f"{name}.blob").write_text(name)
        (snap / name).symlink_to(Path("..", "..", "blobs", f"{name}.blob"))
    for name in ("config.json", "model.safetensors"):
        assert ev.main(["--model", str(snap), "--data", data, "--out", str(snap / name)]) == 2, name
        assert "is a file of the model being evaluated" in _err_line(capsys)
        assert (snap / name).is_symlink() and (snap / name).read_text() == name
    # the run's outputs beside the model: its metrics, summary, evaluation outputs, other checkpoints
    (run / "metrics.jsonl").write_text("m")
    for out in ("run/metrics.jsonl", "run/summary.json", "run/eval_outputs/final.jsonl", "run/warmup/x.json",
                "run/Metrics.JSONL", "run/Eval_Outputs/final.jsonl", "Run/metrics.jsonl", "RUN/Warmup/x.json"):
        assert ev.main(["--model", "run/final", "--data", data, "--outputs", out]) == 2, out
        line = _err_line(capsys)
        assert "is among the outputs of the run --model run/final belongs to" in line, line
    assert (run / "metrics.jsonl").read_text() == "m" and not (run / "eval_outputs").exists()
    # a run whose real path has capitals, its model reached through a link: its outputs are its own
    up = tmp_path / "Upper" / "final"
    up.mkdir(parents=True)
    (up / "config.json").write_text("{}")
    (up.parent / "config.yaml").write_text("c")
    (tmp_path / "uplink").symlink_to(up)
    assert ev.main(["--model", "uplink", "--data", data, "--outputs", "Upper/metrics.jsonl"]) == 2
    assert "is among the outputs of the run --model uplink belongs to" in _err_line(capsys)
    # a new file beside the model's: the checks pass (and the CLI goes on to load the model)
    with pytest.raises(AssertionError, match="past its input checks"):
        ev.main(["--model", "run/final", "--data", data, "--out", "run/final/eval.json",
                 "--outputs", "run/outputs.jsonl"])


class _Proc:
    def chat_prompt(self, user, with_image):
        return user


class _SlowToVerify:
    """Completions whose final answer (14/2 against 7) math-verify must check symbolically."""

    def generate(self, prompts, n, sampling):
        from r1vl.rollout.base import Completion

        return [Completion(i, [1], "### Step 1: 4 + 3 = 7\n### The final answer is: \\frac{14}{2}", "stop")
                for i in range(len(prompts))]


def test_evaluate_reports_reward_timeouts(caplog):
    """An answer whose check hits the time limit is scored wrong: the result says how many did
    (reward_timeouts, as the StepGRPO steps' metric), each output record whether it did, and a
    warning names the limit; without timeouts, no warning."""
    from types import SimpleNamespace

    samples = [SimpleNamespace(problem="Q", solution="### The final answer is: 7", image=None, meta={},
                               key_steps=[["4 + 3 = 7"]])] * 3
    with caplog.at_level(logging.WARNING, logger="r1vl.eval"):
        ok = ev.evaluate(_SlowToVerify(), _Proc(), samples, max_new_tokens=4, keep_outputs=True)
    assert ok["accuracy"] == 1.0 and ok["reward_timeouts"] == 0 and not caplog.records
    assert [r["timed_out"] for r in ok["outputs"]] == [False] * 3
    from r1vl.rewards import verify

    verify._equal_cache.clear()  # the first run's comparisons, kept: computed again under the tiny limit
    with caplog.at_level(logging.WARNING, logger="r1vl.eval"):
        late = ev.evaluate(_SlowToVerify(), _Proc(), samples, max_new_tokens=4, keep_outputs=True,
                           reward_timeout_s=1e-6)
    assert late["accuracy"] == 0.0 and late["reward_timeouts"] == 3
    assert [r["timed_out"] for r in late["outputs"]] == [True] * 3
    assert "3 of 3" in caplog.text and "1e-06 s" in caplog.text and "wrong" in caplog.text, caplog.text


def test_cli_reward_timeout_comes_from_the_run_and_the_flag(tiny_run, data_dir, tmp_path, monkeypatch, capsys):
    """The trainer's evaluation scores with algorithm.reward_timeout_s: so does the CLI on that
    run's model (--reward-timeout-s wins); the JSON and --outputs carry the timeouts."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    dump_config(load_config(run / "config.yaml", ["algorithm.reward_timeout_s=7.5"]), run / "config.yaml")
    seen = {}
    real = ev.evaluate

    def spy(*a, **kw):
        seen["timeout"] = kw["reward_timeout_s"]
        return real(*a, **kw)

    monkeypatch.setattr(ev, "evaluate", spy)
    outputs = tmp_path / "o.jsonl"
    capsys.readouterr()
    assert ev.main(["--model", str(run / "final"), "--data", str(data_dir), "--n", "3", "--outputs", str(outputs)]) == 0
    res = json.loads(capsys.readouterr().out)
    recs = [json.loads(x) for x in outputs.read_text().splitlines()]
    assert seen["timeout"] == 7.5
    assert res["reward_timeouts"] == sum(r["timed_out"] for r in recs) and len(recs) == 3
    assert ev.main(["--model", str(run / "final"), "--data", str(data_dir), "--n", "1",
                    "--reward-timeout-s", "0.5"]) == 0
    assert seen["timeout"] == 0.5


def test_cli_reward_workers_score_in_processes_with_the_same_result(tiny_run, data_dir, tmp_path, monkeypatch,
                                                                   capsys):
    """--reward-workers N hands evaluate() N scoring processes (a batch scored while the next is
    generated); the JSON result and the outputs are as in-process scoring's."""
    seen = []
    real = ev.evaluate

    def spy(*a, **kw):
        seen.append(kw["reward_workers"])
        return real(*a, **kw)

    monkeypatch.setattr(ev, "evaluate", spy)
    results = []
    for extra in ([], ["--reward-workers", "2"]):
        outputs = tmp_path / f"o{len(extra)}.jsonl"
        capsys.readouterr()
        assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "4", "--batch-size", "2",
                        "--outputs", str(outputs), *extra]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res.pop("outputs") == str(outputs)
        res.pop("seconds", None)
        results.append((res, outputs.read_text()))
    assert seen == [0, 2] and results[0] == results[1]
    with pytest.raises(SystemExit):
        ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--reward-workers", "-1"])


@pytest.fixture
def as_rank(monkeypatch):
    """Run main() as if torchrun had started this process as another rank: main() turns off
    transformers' progress bars and quiets this CLI's log there; both come back after the test."""
    import transformers

    level = logging.getLogger("r1vl.eval").level
    bars = transformers.utils.logging.is_progress_bar_enabled()

    def set_env(rank: int, world: int | None):
        monkeypatch.setenv("RANK", str(rank))
        if world is None:
            monkeypatch.delenv("WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("WORLD_SIZE", str(world))

    yield set_env
    logging.getLogger("r1vl.eval").setLevel(level)
    if bars:
        transformers.utils.logging.enable_progress_bar()


def test_error_of_one_rank_is_printed_by_that_rank(tiny_run, data_dir, tmp_path, capsys, monkeypatch, as_rank):
    """Under torchrun a failure on rank 1 alone (its GPU, its file system) was never shown: only
    rank 0 printed, and torchrun killed it. The rank prints it, prefixed with its rank; an
    argument mistake, which every rank meets alike, is still printed by rank 0 alone."""
    import r1vl.utils
    from r1vl.utils import Dist

    as_rank(1, 2)
    monkeypatch.setattr(r1vl.utils, "init_distributed", lambda *a, **k: Dist(rank=1, world=2))

    def vanished(*a, **k):
        raise OSError("image file vanished on rank 1")

    monkeypatch.setattr(ev, "evaluate", vanished)
    capsys.readouterr()
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "2"]) == 2
    assert _err_line(capsys) == "r1vl.eval: error: [rank 1] image file vanished on rank 1"
    same = tmp_path / "same.json"
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--out", str(same),
                    "--outputs", str(same)]) == 2
    assert "error" not in capsys.readouterr().err


def test_model_load_failure_on_every_rank_is_printed_once(fake_model, data_dir, capsys, monkeypatch, as_rank):
    """A checkpoint no rank can load is one line (rank 0's); a load failure of rank 1 alone is
    rank 1's to print."""
    import r1vl.utils
    from r1vl.utils import Dist

    as_rank(1, 2)
    monkeypatch.setattr(r1vl.utils, "init_distributed", lambda *a, **k: Dist(rank=1, world=2))
    for others, printed in ((None, True), ("same", False)):
        def gather(obj, d, others=others):
            return [obj if others == "same" else others, obj]

        monkeypatch.setattr(r1vl.utils, "all_gather_objects", gather)
        capsys.readouterr()
        assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--n", "1"]) == 2
        err = capsys.readouterr().err
        assert (f"r1vl.eval: error: [rank 1] --model {fake_model}: " in err) == printed, err[-2000:]
        assert ("r1vl.eval: error" in err) == printed


def test_stray_rank_without_world_size_is_an_error(fake_model, data_dir, capsys, as_rank):
    """RANK=1 left in the environment by an enclosing job (no WORLD_SIZE: not torchrun) made the
    CLI a silent rank 1 of one process: exit 0, nothing printed, items 1.. alone evaluated."""
    from r1vl.utils import init_distributed

    as_rank(1, None)
    with pytest.raises(ValueError, match="RANK=1 but WORLD_SIZE"):
        init_distributed("gloo")
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir), "--n", "1"]) == 2
    line = _err_line(capsys)
    assert line.startswith("r1vl.eval: error: RANK=1 but WORLD_SIZE") and "unset RANK" in line, line
    # and before the input checks, which rank 0 alone prints: a missing --data said nothing
    assert ev.main(["--model", str(fake_model), "--data", str(data_dir / "missing")]) == 2
    assert _err_line(capsys).startswith("r1vl.eval: error: RANK=1 but WORLD_SIZE")
    as_rank(0, None)
    assert init_distributed("gloo").world == 1


def test_corrupt_weights_file_is_one_line(tiny_run, data_dir, tmp_path, capsys):
    """A truncated model.safetensors raised safetensors' own error: a traceback and exit 1."""
    import shutil

    from r1vl.models import ModelLoadError, load_pretrained

    model = tmp_path / "final"
    shutil.copytree(tiny_run / "final", model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_pretrained(model)
    assert ev.main(["--model", str(model), "--data", str(data_dir), "--n", "1"]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"r1vl.eval: error: --model {model}: cannot load (") and "header" in line, line


def test_weights_that_do_not_fit_the_model_are_refused(tiny_run, data_dir, tmp_path, capsys):
    """A checkpoint lacking tensors (or holding them under other names: another model's, a
    prefix) was loaded with those initialised at random, transformers saying so in a table
    only: evaluated (or trained from) as if it were the model, exit code 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    from r1vl.models import ModelLoadError, load_pretrained

    weights = load_file(tiny_run / "final" / "model.safetensors")
    norm = next(k for k in weights if k in ("model.norm.weight", "model.language_model.norm.weight"))
    for name, kept in (("dropped", {k: v for k, v in weights.items() if "embed_tokens" not in k}),
                       ("renamed", {"base_model." + k: v for k, v in weights.items()}),
                       ("reshaped", {**weights, norm: torch.ones(weights[norm].shape[0] + 1)})):
        model = tmp_path / name
        shutil.copytree(tiny_run / "final", model)
        save_file(kept, model / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ModelLoadError, match="its weights do not fit the model its config.json describes"):
            load_pretrained(model)
        assert ev.main(["--model", str(model), "--data", str(data_dir), "--n", "1"]) == 2
        line = _err_line(capsys)
        assert line.startswith(f"r1vl.eval: error: --model {model}: its weights do not fit the model"), line
        assert ("a tensor of another shape" if name == "reshaped" else "they would be random") in line, line
        if name == "renamed":
            assert "it does not use (first base_model." in line
    load_pretrained(tiny_run / "final")  # the run's own loads


def _fake_evaluate(engine, processor, samples, keep_outputs=False, **kw):
    """evaluate's result shape, without generating."""
    n = len(samples)
    res = {"n": n, "accuracy": 0.0, "correct_items": [0.0] * n}
    if keep_outputs:
        res["outputs"] = [{"index": i, "completion": f"c{i}", "correct": 0.0} for i in range(n)]
    return res


@pytest.mark.parametrize("exc,rc", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_failed_outputs_write_leaves_no_temporary(exc, rc, tiny_run, data_dir, tmp_path, capsys, monkeypatch):
    """Disk full or Ctrl-C while --outputs is written: no outputs.jsonl.tmp is left; Ctrl-C is
    the CLI's one line and exit 130, not a KeyboardInterrupt traceback."""
    monkeypatch.setattr(ev, "evaluate", _fake_evaluate)
    real = json.dumps
    calls = []

    def dumps(obj, *a, **k):
        if isinstance(obj, dict) and "completion" in obj:
            calls.append(1)
            if len(calls) == 3:
                raise exc
        return real(obj, *a, **k)

    monkeypatch.setattr(ev.json, "dumps", dumps)
    out_dir = tmp_path / "o"
    capsys.readouterr()
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "5",
                    "--outputs", str(out_dir / "outputs.jsonl")]) == rc
    assert list(out_dir.iterdir()) == []
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if rc == 130:
        assert err.strip().splitlines()[-1] == "r1vl.eval: interrupted (Ctrl-C): no result"
    else:
        assert "--outputs " in err and "cannot write (No space left on device)" in err


@pytest.mark.parametrize("exc,rc", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
def test_out_is_written_atomically(exc, rc, tiny_run, data_dir, tmp_path, capsys, monkeypatch):
    """--out was rewritten in place: a failed write lost the previous result. Now a failure
    before the new file is complete leaves the previous one, and no temporary."""
    import os

    monkeypatch.setattr(ev, "evaluate", _fake_evaluate)
    out = tmp_path / "o" / "eval.json"
    out.parent.mkdir()
    out.write_text("previous result\n")
    real = os.replace

    def failing_replace(src, dst, *a, **k):
        if Path(dst) == out:
            raise exc
        return real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", failing_replace)
    capsys.readouterr()
    assert ev.main(["--model", str(tiny_run / "final"), "--data", str(data_dir), "--n", "2", "--out", str(out)]) == rc
    assert out.read_text() == "previous result\n" and list(out.parent.iterdir()) == [out]
    std = capsys.readouterr()
    assert json.loads(std.out)["n"] == 2 and "Traceback" not in std.err  # the result is on stdout
    last = std.err.strip().splitlines()[-1]
    assert last.startswith("r1vl.eval: interrupted (Ctrl-C)" if rc == 130 else f"r1vl.eval: error: --out {out}: ")
    assert "printed above" in last


def test_run_directory_as_data_suggests_its_test_split(fake_model, tmp_path, capsys, no_eval):
    """--data runs/X (the run, not its data/) suggested the run's metrics.jsonl as a data file."""
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    for name in ("metrics.jsonl", "rollouts.jsonl", "skipped_rows.jsonl"):
        (run / name).write_text("{}\n")
    (run / "data" / "test.jsonl").write_text("{}\n")
    assert ev.main(["--model", str(fake_model), "--data", str(run)]) == 2
    line = _err_line(capsys)
    assert line.startswith(f"r1vl.eval: error: --data {run}: ") and str(run / "data" / "test.jsonl") in line, line
    assert not any(x in line for x in ("metrics.jsonl", "rollouts.jsonl", "skipped_rows.jsonl")), line
    (run / "data" / "test.jsonl").unlink()
    (run / "mine.jsonl").write_text("{}\n")
    assert ev.main(["--model", str(fake_model), "--data", str(run)]) == 2
    line = _err_line(capsys)
    assert str(run / "mine.jsonl") in line and "metrics.jsonl" not in line, line


def test_help_describes_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "as a CLI:" not in out and "--batch-size" in out
    assert "default: 64" in out.split("--batch-size", 2)[-1].split("--min-pixels")[0]
    assert "--reward-timeout-s" in out and "algorithm.reward_timeout_s" in out


@pytest.mark.slow
def test_torchrun_error_of_rank_1_is_shown(tiny_run, data_dir, tmp_path):
    """The audit's case end to end: rank 1's generation fails with an error the CLI reports;
    its message reaches the terminal (torchrun itself says only "exitcode: 2")."""
    import os

    from ports import free_port

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import r1vl.rollout.hf_engine as h\n"
        "    def boom(self, *a, **k):\n"
        "        raise OSError('INJECTED: image file vanished on rank 1')\n"
        "    h.HFEngine.generate = boom\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(inject), os.environ.get("PYTHONPATH")])))
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    r = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "r1vl.eval",
                        "--model", str(tiny_run / "final"), "--data", str(data_dir), "--limit", "4"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "r1vl.eval: error: [rank 1] INJECTED: image file vanished on rank 1" in r.stderr, r.stderr[-3000:]


def test_a_run_config_with_todays_refused_training_settings_still_gives_its_settings(tmp_path, caplog):
    """A run written before a training choice was refused (data.test left at synthetic beside a
    data.train file, top_k=1): the CLI threw its config away and evaluated with the built-in
    defaults (96 new tokens instead of the run's 1024), with a warning."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("data:\n  train: mine/train.jsonl\n  max_pixels: 200704\nrollout:\n  max_completion_length: 1024\n"
                   "  top_k: 1\n")
    with caplog.at_level("WARNING"):
        run = ev.load_run_config(cfg)
    assert run is not None and not caplog.records
    values, _ = ev.resolve_settings({}, run, cfg)
    assert values["max_new_tokens"] == 1024 and values["max_pixels"] == 200704


@pytest.mark.slow
def test_dtype_follows_the_run_and_bad_rows_can_be_left_out(tiny_run, data_dir, tmp_path, monkeypatch, caplog,
                                                            capsys):
    """--dtype auto decodes in the run's compute dtype (a bf16 run was scored in fp32 on a CPU,
    other completions than its own evaluation's); --skip-bad-rows (or the run's
    data.skip_bad_rows) leaves out an unloadable or undecodable row, as the trainer's evaluation
    did, instead of stopping."""
    import json
    import shutil

    from r1vl.config import dump_config, load_config

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "final", run / "final")
    assert ev.saved_dtype(run / "final") == "float32"  # tiny_run's weights
    cfg_json = run / "final" / "config.json"
    cfg_json.write_text(json.dumps({**json.loads(cfg_json.read_text()), "dtype": "bfloat16"}))  # a bf16 run's
    dump_config(load_config(None, ["model.dtype=bfloat16", "rollout.max_completion_length=3"]), run / "config.yaml")
    seen = {}

    def fake_evaluate(engine, processor, samples, **kw):
        seen["dtype"] = next(engine.model.parameters()).dtype
        seen["problems"] = [samples[i].problem for i in range(len(samples))]
        return {"n": len(samples), "accuracy": 0.0, "correct_items": [0.0] * len(samples)}

    monkeypatch.setattr(ev, "evaluate", fake_evaluate)
    rows = [json.loads(x) for x in (data_dir / "test.jsonl").read_text().splitlines()][:4]
    own = tmp_path / "data"
    own.mkdir()
    for r in rows:
        shutil.copyfile(data_dir / r["image_path"], own / Path(r["image_path"]).name)
        r["image_path"] = Path(r["image_path"]).name
    whole = (own / rows[1]["image_path"]).read_bytes()
    (own / "cut.png").write_bytes(whole[: len(whole) * 2 // 3])  # the header reads, the decode fails
    rows[1]["image_path"] = "cut.png"
    rows[2]["image_path"] = "missing.png"
    (own / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--model", str(run / "final"), "--data", str(own / "test.jsonl")]
    assert ev.main(args) == 2
    assert "--skip-bad-rows" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="r1vl.eval"):
        assert ev.main(args + ["--skip-bad-rows", "--limit", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dtype"] == "bfloat16" and seen["dtype"] == torch.bfloat16 and "the run's compute dtype" in caplog.text
    # under DeepSpeed bf16 the weights are saved in bf16 whatever model.dtype (and the run's
    # deepspeed path is relative to where it ran): the saved dtype is what its evaluation used
    dump_config(load_config(None, ["model.dtype=float32", "deepspeed=elsewhere/ds_zero2.json"]), run / "config.yaml")
    assert ev.main(args + ["--skip-bad-rows"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    assert res["n"] == 2 and res["skipped_rows"] == 2
    assert seen["problems"] == [rows[0]["problem"], rows[3]["problem"]]  # the first 3 rows that load: 2 left


def test_paired_comparison_is_the_exact_two_sided_sign_test():
    """Ties (both right, both wrong) left out; p = twice the smaller binomial(n, 1/2) tail, at
    most 1; summed term by term (math.comb per term took 33 s at 19,800 changed items)."""
    import math

    from r1vl.eval import paired_comparison

    def p(fixed, broken, same=0):
        before = [0.0] * fixed + [1.0] * broken + [1.0] * same
        after = [1.0] * fixed + [0.0] * broken + [1.0] * same
        r = paired_comparison(before, after)
        assert (r["fixed"], r["broken"]) == (fixed, broken)
        return r["p_value"]

    assert (p(0, 0, 5), p(1, 0), p(5, 0), p(0, 5), p(3, 3), p(6, 0, 100)) == (1.0, 1.0, 0.0625, 0.0625, 1.0, 0.03125)
    for f in range(0, 30, 3):
        for b in range(0, 30, 4):
            n, k = f + b, min(f, b)
            want = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
            assert p(f, b) == want, (f, b)
    assert p(9900, 9900) == 1.0 and p(10300, 9500) < 1e-7  # large sets: exact, and quick
    with pytest.raises(ValueError, match="different items"):
        paired_comparison([1.0], [1.0, 0.0])


def test_evaluate_scores_a_batch_while_the_next_is_generated_with_the_same_results(monkeypatch):
    """With reward_workers > 0 a batch's completions are scored (off the main thread) while the
    next batch is generated; the results, outputs in data order and progress are as in-line
    scoring's (reward_workers=0, on the main thread)."""
    import threading
    from types import SimpleNamespace

    from r1vl.rollout.base import Completion

    events = []
    second = threading.Event()  # (an event, not a sleep: a busy machine outlasted a 0.5 s sleep)

    class Engine:
        def generate(self, prompts, n, sampling):
            events.append(("generate", len(prompts)))
            if [e[0] for e in events].count("generate") == 2:
                second.set()
            return [Completion(i, [1] * (1 + len(p.text) % 3),
                               f"### Step 1: 4 + 3 = 7\n### The final answer is: {7 if 'Q7' in p.text else 5}", "stop")
                    for i, p in enumerate(prompts)]

    real_score = ev.score

    def score(texts, samples, **kw):
        events.append(("score", threading.current_thread() is threading.main_thread()))
        if kw["workers"] and [e[0] for e in events].count("score") == 1:
            second.wait(60)  # the next batch's generate starts meanwhile (else: in 60 s, and the order shows it)
        out = real_score(texts, samples, **kw)
        events.append(("scored", None))
        return out

    monkeypatch.setattr(ev, "score", score)
    samples = [SimpleNamespace(problem=f"Q{i % 4 + 5}", solution="### The final answer is: 7", image=None,
                               meta={"family": f"f{i % 2}"}, key_steps=[["4 + 3 = 7"]]) for i in range(7)]
    runs = {}
    for workers in (0, 2):
        events.clear()
        second.clear()
        runs[workers] = ev.evaluate(Engine(), _Proc(), samples, max_new_tokens=4, batch_size=3, keep_outputs=True,
                                    reward_workers=workers)
        kinds = [e[0] for e in events]
        assert kinds.count("generate") == kinds.count("score") == kinds.count("scored") == 3, kinds
        if workers:
            second = [i for i, k in enumerate(kinds) if k == "generate"][1]
            assert kinds[:2] == ["generate", "score"] and kinds.index("scored") > second, kinds
            assert not any(e[1] for e in events if e[0] == "score")
        else:
            assert all(e[1] for e in events if e[0] == "score")
    for r in runs.values():
        r.pop("seconds")
    assert runs[0] == runs[2] and runs[0]["accuracy"] == pytest.approx(2 / 7)


@pytest.mark.parametrize("scoring_fails", [False, True])
@pytest.mark.parametrize("how", ["stopped", "generate_failed"])
def test_an_evaluation_that_stops_or_fails_leaves_no_batch_scored_behind_it(monkeypatch, how, scoring_fails):
    """With reward workers a batch is scored in a background thread while the next one is
    generated. Stopped by a signal (EvalStopped) or failed in the next batch's generate,
    evaluate() raised with that thread still scoring: it held the reward pool, which a caller's
    next scoring (the trainer's checkpoint path, an in-process retry) then waited for. It is
    waited for now, its scores (or its own error) dropped, and the original exception raised."""
    started, ended = threading.Event(), threading.Event()

    def score(texts, samples, **kw):
        started.set()
        time.sleep(0.5)
        ended.set()
        if scoring_fails:
            raise ValueError("scoring failed")
        return {"correct": [1.0] * len(texts)}  # never collected: its batch is the one in flight

    class Engine:
        calls = 0

        def generate(self, prompts, n, sampling):
            from r1vl.rollout.base import Completion

            Engine.calls += 1
            if how == "generate_failed" and Engine.calls == 2:
                assert started.wait(10)
                raise RuntimeError("CUDA out of memory (stand-in)")
            return [Completion(i, [1], "### The final answer is: 7", "stop") for i in range(len(prompts))]

    monkeypatch.setattr(ev, "score", score)
    samples = _family_samples(["Q7"] * 4, ["f"] * 4)
    stops = iter([0, 15] if how == "stopped" else [])
    with pytest.raises(ev.EvalStopped if how == "stopped" else RuntimeError) as info:
        ev.evaluate(Engine(), _Proc(), samples, max_new_tokens=4, batch_size=2, reward_workers=1,
                    stop=(lambda: next(stops)) if how == "stopped" else None)
    assert ended.is_set()  # (it was still asleep: 0.5 s)
    assert not [t for t in threading.enumerate() if t.name == "r1vl-rewards"]
    assert "scoring failed" not in str(info.value)


def test_the_engine_folders_of_killed_evaluations_on_this_host_are_swept(tmp_path):
    """The vLLM engine's temporary model folder (config + processor files, a few MB) is removed
    by the evaluation itself, unless it was killed (SIGKILL, the OOM killer): those were left in
    the temporary directory for good. Named by host and process now, a later evaluation removes
    those of this host whose process is gone, and no other: a live process's, another host's
    (a temporary directory on a shared file system), its own, anything else."""
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = tmp_path / f"{ev._work_prefix(gone.pid)}abc123"
    live = tmp_path / f"{ev._work_prefix(os.getppid())}abc123"
    mine = tmp_path / f"{ev._work_prefix()}abc123"
    other_host = tmp_path / ev._work_prefix(gone.pid).replace(ev._WORK_PREFIX, ev._WORK_PREFIX + "elsewhere", 1)
    unrelated = tmp_path / "r1vl-eval-notes"
    for p in (dead, live, mine, other_host, unrelated):
        (p / "vllm_engine_model").mkdir(parents=True)
        (p / "vllm_engine_model" / "config.json").write_text("{}")
    assert ev._sweep_stale_work(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, mine, other_host, unrelated))


class _Q7Engine:  # right answer for problems "Q7", wrong otherwise
    def generate(self, prompts, n, sampling):
        from r1vl.rollout.base import Completion

        return [Completion(i, [1], f"### The final answer is: {7 if 'Q7' in p.text else 5}", "stop")
                for i, p in enumerate(prompts)]


def _family_samples(problems, families):
    return [SimpleNamespace(problem=p, solution="### The final answer is: 7", image=None, key_steps=None,
                            meta={"family": f}) for p, f in zip(problems, families)]


def test_evaluate_family_accuracy():
    """accuracy_<family> is the family's own accuracy."""
    from r1vl import eval as ev

    s = _family_samples(["Q7", "Q5", "Q7", "Q7"], ["a", "a", "b", "b"])
    out = ev.evaluate(_Q7Engine(), _Proc(), s, max_new_tokens=4, batch_size=2)
    assert out["accuracy_a"] == pytest.approx(0.5) and out["accuracy_b"] == pytest.approx(1.0)
    assert out["accuracy"] == pytest.approx(0.75) and out["correct_items"] == [1.0, 0.0, 1.0, 1.0]


def test_evaluate_counts_timeouts_over_every_batch(monkeypatch):
    """reward_timeouts sums the batches' timeouts (not the last batch's alone)."""
    from r1vl import eval as ev

    def score(texts, samples, **kw):
        n = len(texts)
        return {"accuracy": [0.0] * n, "validity": [0.0] * n, "total": [0.0] * n, "correct": [0.0] * n,
                "timed_out": [1.0] * n, "timeouts": float(n)}

    monkeypatch.setattr(ev, "score", score)
    out = ev.evaluate(_Q7Engine(), _Proc(), _family_samples(["Q7"] * 5, [None] * 5), max_new_tokens=4, batch_size=2)
    assert out["reward_timeouts"] == 5


def test_evaluate_reduces_counts_over_ranks(monkeypatch):
    """On 2 ranks (a stand-in all_reduce: the other rank equal to this one) n and reward_timeouts
    are totals over the ranks, and every rank reduces the same family keys, from the whole
    set, even one whose shard lacks a family."""
    import r1vl.utils
    from r1vl import eval as ev
    from r1vl.utils import Dist

    keys = []

    def reduce(v, d):
        keys.append(len(v))
        return [2 * x for x in v]

    monkeypatch.setattr(r1vl.utils, "all_reduce_sum", reduce)
    monkeypatch.setattr(r1vl.utils, "all_gather_objects", lambda o, d: [o] * d.world)
    real_score = ev.score

    def score(texts, samples, **kw):
        return dict(real_score(texts, samples, **kw), timeouts=1.0)

    monkeypatch.setattr(ev, "score", score)
    s = _family_samples(["Q7", "Q5", "Q7", "Q5"], ["a", "b", "a", "b"])  # rank 1 holds family b alone
    out0 = ev.evaluate(_Q7Engine(), _Proc(), s, max_new_tokens=4, batch_size=1, d=Dist(rank=0, world=2))
    out1 = ev.evaluate(_Q7Engine(), _Proc(), s, max_new_tokens=4, batch_size=1, d=Dist(rank=1, world=2))
    assert out0["n"] == 4 and out0["reward_timeouts"] == 4  # 2 batches of 1 on each of 2 ranks
    assert keys[0] == keys[1] and "accuracy_a" in out1 and "accuracy_b" in out0


def test_score_job_scores_again_in_the_callers_thread_after_a_pool_error():
    """A RewardPoolError of the background thread is scored again in the caller's thread, not raised."""
    from r1vl import eval as ev
    from r1vl.rewards.pool import RewardPoolError

    calls = []

    def fn():
        calls.append(threading.current_thread() is threading.main_thread())
        if not calls[-1]:
            raise RewardPoolError("off the main thread")
        return {"ok": 1}

    assert ev.ScoreJob(fn, background=True).result() == {"ok": 1} and calls == [False, True]
