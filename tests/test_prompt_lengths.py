"""data.max_prompt_length over the whole training split at start-up (r1vl.train.prompt_lengths,
check_all_prompt_lengths, --check)."""
import json
import types

import pytest
from PIL import Image

from r1vl.data import load_dataset
from r1vl.eval import make_prompt
from r1vl.models import VLProcessor, make_image_processor, synthetic_corpus, train_tokenizer
from r1vl.train import UserError, check_all_prompt_lengths, main, prompt_lengths

SOL = "### Image Description:\nx\n### Rationales:\ny\n### Step 1:\n2 + 2 = 4\n### The final answer is: 4"
# (width, height): small, elongated both ways, over max_pixels, odd sizes
SIZES = [(60, 40), (30, 500), (700, 90), (1000, 700), (57, 57), (2000, 15)]
PX = dict(min_pixels=56 * 56, max_pixels=224 * 224)


@pytest.fixture(scope="module")
def processor():
    return VLProcessor(train_tokenizer(synthetic_corpus(50), 300), make_image_processor(**PX))


def write_data(tmp_path, problems, sizes=SIZES):
    (tmp_path / "img").mkdir(exist_ok=True)
    path = tmp_path / "train.jsonl"
    with open(path, "w") as f:
        for i, (problem, (w, h)) in enumerate(zip(problems, sizes)):
            Image.new("RGB", (w, h), (i * 40 % 255, 90, 200)).save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image_path": f"img/{i}.png", "problem": problem, "solution": SOL,
                                "key_steps": None}) + "\n")
    return path


PROBLEMS = ["What is 2 + 2?", "x" * 300, "Find the area. " * 20, "short", "Σ ∫ émoji 🙂 <b>tags</b>", "1 2 3 4 5 6"]


@pytest.mark.parametrize("template", ["r1vl", "verbatim"])
def test_lengths_equal_what_the_processor_makes(tmp_path, processor, template):
    ds = load_dataset(write_data(tmp_path, PROBLEMS), **PX)
    got = prompt_lengths(ds, processor, template, chunk=4)  # chunk < rows: two tokenizer calls
    want = []
    for i in range(len(ds)):
        p = make_prompt(processor, ds[i], template)  # decoded, resized, through the image processor
        want.append(int(processor([p.text], [p.image])["attention_mask"].sum()))
    assert got == want
    assert len(set(got)) > 3  # the sizes and texts really differ


def _cfg(limit, skip=False):
    data = types.SimpleNamespace(max_prompt_length=limit, prompt_template="r1vl", skip_bad_rows=skip)
    return types.SimpleNamespace(data=data)


def test_rows_over_the_limit_stop_the_run_or_are_left_out(tmp_path, processor, caplog):
    ds = load_dataset(write_data(tmp_path, PROBLEMS), **PX)
    lengths = prompt_lengths(ds, processor, "r1vl")
    limit = sorted(lengths)[2]  # three rows over
    over = [i for i, n in enumerate(lengths) if n > limit]
    assert check_all_prompt_lengths(ds, processor, _cfg(max(lengths))) is ds
    with pytest.raises(UserError) as e:
        check_all_prompt_lengths(ds, processor, _cfg(limit))
    msg = str(e.value)
    assert f"3 of 6 prompts are longer than data.max_prompt_length={limit}" in msg
    assert f"train.jsonl:{over[0] + 1}: {lengths[over[0]]} tokens" in msg
    assert f"data.max_prompt_length={max(lengths)}" in msg and "data.skip_bad_rows=true" in msg
    kept = check_all_prompt_lengths(ds, processor, _cfg(limit, skip=True))
    assert [kept[i].problem for i in range(len(kept))] == [p for i, p in enumerate(PROBLEMS) if i not in over]
    assert [s for s, _ in kept.skipped] == [ds.source(i) for i in over]
    assert all(f"over data.max_prompt_length={limit}" in why for _, why in kept.skipped)
    assert "left out" in caplog.text
    with pytest.raises(UserError, match="6 of 6 prompts"):  # nothing left to train on
        check_all_prompt_lengths(ds, processor, _cfg(1, skip=True))


def test_check_reports_long_prompts_before_a_run(tmp_path, capsys):
    train = write_data(tmp_path, PROBLEMS)
    args = ["--check", f"output_dir={tmp_path / 'o'}", f"data.train={train}", f"data.test={train}",
            f"data.min_pixels={PX['min_pixels']}", f"data.max_pixels={PX['max_pixels']}",
            "model.tiny.tokenizer_corpus_size=6", "model.tiny.vocab_size=300"]
    assert main(args + ["data.max_prompt_length=40"]) == 2
    err = capsys.readouterr().err
    assert "of 6 prompts are longer than data.max_prompt_length=40" in err, err
    assert main(args + ["data.max_prompt_length=4000"]) == 0
    assert "config OK" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()  # --check writes nothing


def test_evaluated_prompts_must_fit_the_vllm_budget(tmp_path, processor):
    from r1vl.train import check_eval_prompt_lengths

    ds = load_dataset(write_data(tmp_path, PROBLEMS), **PX)
    lengths = prompt_lengths(ds, processor, "r1vl")
    image_budget = PX["max_pixels"] // (28 * 28)

    def cfg(limit, eval_size):
        return types.SimpleNamespace(data=types.SimpleNamespace(
            max_prompt_length=limit, max_pixels=PX["max_pixels"], eval_size=eval_size))

    check_eval_prompt_lengths(ds, processor, cfg(max(lengths) - image_budget, 0))
    with pytest.raises(UserError) as e:
        check_eval_prompt_lengths(ds, processor, cfg(max(lengths) - image_budget - 1, 0))
    assert f"raise data.max_prompt_length to {max(lengths) - image_budget}" in str(e.value)
    # only the evaluated rows (data.eval_size) count
    first = max(range(len(lengths)), key=lengths.__getitem__)
    check_eval_prompt_lengths(ds, processor, cfg(max(lengths) - image_budget - 1, first))


def _sharded_worker(rank, world, port, tmp, fail_rank):
    import os

    import torch
    import torch.distributed as dist

    from r1vl.utils import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        processor = VLProcessor(train_tokenizer(synthetic_corpus(50), 300), make_image_processor(**PX))
        ds = load_dataset(os.path.join(tmp, "train.jsonl"), **PX)
        calls = []
        parts = ds.prompt_parts

        def counted(i):
            calls.append(i)
            if rank == fail_rank:
                raise ValueError("broken row on purpose")
            return parts(i)

        ds.prompt_parts = counted
        try:
            got = prompt_lengths(ds, processor, "r1vl", chunk=2, d=Dist(rank=rank, world=world))
        except Exception as e:
            got = f"{type(e).__name__}: {e}"
        with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
            json.dump({"got": got, "calls": calls}, f)
    finally:
        dist.destroy_process_group()
    from r1vl.utils import exit_after_collectives

    exit_after_collectives(0)  # no interpreter teardown after collectives (its docstring says why)


@pytest.mark.parametrize("fail_rank", [-1, 1])
def test_ranks_share_the_measurement(tmp_path, processor, fail_rank):
    """Each of 2 gloo ranks measures every other row; both get the single-process list. A rank
    that fails makes every rank raise (none is left waiting in the gather)."""
    import torch.multiprocessing as mp
    from ports import free_port

    ds = load_dataset(write_data(tmp_path, PROBLEMS[:5] + ["seven"] * 2, SIZES + [(80, 90)]), **PX)
    want = prompt_lengths(ds, processor, "r1vl")
    mp.start_processes(_sharded_worker, args=(2, free_port(), str(tmp_path), fail_rank), nprocs=2, join=True,
                       start_method="spawn")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    if fail_rank < 0:
        assert res[0]["got"] == res[1]["got"] == want
        assert sorted(res[0]["calls"]) == [0, 2, 4, 6] and sorted(res[1]["calls"]) == [1, 3, 5]
    else:
        assert res[1]["got"] == "ValueError: broken row on purpose"
        assert res[0]["got"].startswith("UserError: measuring prompt lengths failed on rank 1: ValueError")
