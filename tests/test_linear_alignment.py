"""Linear Alignment: the processor's logits against the formula written out at every step, ratio 0 as
the principled model, batched generation with padding equal to one row at a time, refusals, and
the effect: more mass on the principle's words on a tiny LM that has learnt the principle."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from diffalign.text.linear_alignment import LinearAlignment, linear_alignment_logits
from diffalign.text.tiny import NO, TOPICS, YES, build_tiny_causal_lm

PRINCIPLE = "user"  # a word of the tiny vocabulary standing for "answer positively"


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    path = build_tiny_causal_lm(tmp_path_factory.mktemp("la") / "lm")
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer


def hand_step(phi_p: list[float], phi_0: list[float], r: float, tau: float, top_p: float) -> list[float]:
    """One step of official model.py/utils.py in plain Python, as logits (-inf off the nucleus)."""
    scaled = [v / tau for v in phi_p]
    z = max(scaled)
    probs = [pow(2.718281828459045, v - z) for v in scaled]
    total = sum(probs)
    probs = [p / total for p in probs]
    kept, before = set(), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if before < top_p or not kept:
            kept.add(i)
        before += probs[i]
    return [
        ((1 + r) * p - r * o) / tau if i in kept else float("-inf")
        for i, (p, o) in enumerate(zip(phi_p, phi_0, strict=True))
    ]


def last_logits(model, ids: list[int]) -> list[float]:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1].double().tolist()


def test_each_step_is_the_formula(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    principled = tok("user t1 t2 t3", return_tensors="pt")
    plain = tok("t1 t2 t3", return_tensors="pt")
    processor = LinearAlignment(model, plain.input_ids, plain.attention_mask, ratio=2.0, temperature=0.7)
    out = model.generate(
        **principled, logits_processor=[processor], max_new_tokens=5, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    generated = out.sequences[0, principled.input_ids.shape[1] :].tolist()
    assert len(out.scores) == len(generated) == 5
    for t, score in enumerate(out.scores):
        phi_p = last_logits(model, principled.input_ids[0].tolist() + generated[:t])
        phi_0 = last_logits(model, plain.input_ids[0].tolist() + generated[:t])
        want = torch.tensor(hand_step(phi_p, phi_0, 2.0, 0.7, 0.8), dtype=torch.float32)
        torch.testing.assert_close(score[0], want, rtol=1e-4, atol=1e-4)
        assert generated[t] == int(torch.argmax(want))


def test_ratio_zero_is_the_principled_model_top_p_masked(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    g = torch.Generator().manual_seed(0)
    phi_p, phi_0 = torch.randn(3, 40, generator=g), torch.randn(3, 40, generator=g)
    got = linear_alignment_logits(phi_p, phi_0, ratio=0.0, temperature=0.5, top_p=0.8)
    for row in range(3):
        want = hand_step(phi_p[row].tolist(), [0.0] * 40, 0.0, 0.5, 0.8)
        torch.testing.assert_close(got[row], torch.tensor(want), rtol=1e-5, atol=1e-5)
    principled = tok("user t4 t5", return_tensors="pt")
    plain = tok("t4 t5", return_tensors="pt")
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}
    aligned = model.generate(
        **principled, logits_processor=[LinearAlignment(model, plain.input_ids, ratio=0.0)], **kwargs
    )
    assert torch.equal(aligned, model.generate(**principled, **kwargs))


def test_batched_generation_with_padding_equals_one_row_at_a_time(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    rows = [("user t1", "t1"), ("user t2 t3 t4 t5", "t2 t3 t4 t5"), ("user user t6 t7", "t6 t7")]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": tok.pad_token_id}

    def generate(pairs: list[tuple[str, str]]) -> list[list[int]]:
        principled = tok([p for p, _ in pairs], return_tensors="pt", padding=True)
        plain = tok([q for _, q in pairs], return_tensors="pt", padding=True)
        processor = LinearAlignment(model, plain.input_ids, plain.attention_mask, ratio=3.0)
        out = model.generate(**principled, logits_processor=[processor], **kwargs)
        return out[:, principled.input_ids.shape[1] :].tolist()

    batched = generate(rows)
    for row, tokens in zip(rows, batched, strict=True):
        assert generate([row]) == [tokens]


def test_refusals_are_named(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    principled = tok("user t1", return_tensors="pt")
    plain = tok("t1", return_tensors="pt")
    kwargs = {"max_new_tokens": 3, "pad_token_id": tok.pad_token_id}
    with pytest.raises(ValueError, match="beam search"):
        model.generate(**principled, logits_processor=[LinearAlignment(model, plain.input_ids, ratio=1.0)],
                       num_beams=2, **kwargs)  # fmt: skip
    processor = LinearAlignment(model, plain.input_ids, ratio=1.0)
    model.generate(**principled, logits_processor=[processor], **kwargs)
    with pytest.raises(ValueError, match="one generate call"):
        model.generate(**principled, logits_processor=[processor], **kwargs)
    with pytest.raises(ValueError, match="left-padded"):
        LinearAlignment(model, torch.tensor([[5, 0]]), torch.tensor([[1, 0]]), ratio=1.0)
    with pytest.raises(ValueError, match="ratio must be a finite number >= 0"):
        LinearAlignment(model, plain.input_ids, ratio=-1.0)


def test_a_second_generate_call_with_a_longer_prompt_is_refused(lm) -> None:  # type: ignore[no-untyped-def]
    # the longer prompt passed a length-only check and decoded against the first call's cache
    model, tok = lm
    plain = tok(["t1 t2", "t3"], return_tensors="pt", padding=True)
    short = tok(["user t1 t2", "user t3"], return_tensors="pt", padding=True)
    long = tok(
        ["user user user user user t1 t2", "user user user user t3"], return_tensors="pt", padding=True
    )
    kwargs = {"do_sample": False, "pad_token_id": tok.pad_token_id}
    processor = LinearAlignment(model, plain.input_ids, plain.attention_mask, ratio=3.0)
    first = model.generate(**short, logits_processor=[processor], max_new_tokens=2, **kwargs)
    assert long.input_ids.shape[1] > first.shape[1] - 1  # longer than anything the processor saw
    with pytest.raises(ValueError, match="one processor per call"):
        model.generate(**long, logits_processor=[processor], max_new_tokens=4, **kwargs)


@pytest.mark.parametrize(
    ("setting", "value"),
    [("ratio", float("nan")), ("ratio", float("inf")), ("temperature", float("inf")),
     ("temperature", float("nan")), ("temperature", 0.0), ("top_p", float("nan")), ("top_p", 0.0),
     ("top_p", 1.5)],
)  # fmt: skip
def test_non_finite_or_out_of_range_settings_are_named(lm, setting: str, value: float) -> None:  # type: ignore[no-untyped-def]
    model, _ = lm
    settings = {"ratio": 1.0, "temperature": 0.5, "top_p": 0.8, setting: value}
    with pytest.raises(ValueError, match=f"^{setting} must be"):
        LinearAlignment(model, torch.tensor([[5, 6]]), **settings)
    with pytest.raises(ValueError, match=f"^{setting} must be"):
        linear_alignment_logits(torch.zeros(1, 3), torch.zeros(1, 3), **settings)


def test_padded_plain_ids_need_their_mask(lm) -> None:  # type: ignore[no-untyped-def]
    model, tok = lm
    for side in ("right", "left"):
        tok.padding_side = side
        plain = tok(["t1 t2 t3", "t4"], return_tensors="pt", padding=True)
        with pytest.raises(ValueError, match=f"pad id {tok.pad_token_id} but plain_attention_mask"):
            LinearAlignment(model, plain.input_ids, ratio=1.0)
    tok.padding_side = "left"
    LinearAlignment(model, tok(["t1 t2", "t4 t5"], return_tensors="pt").input_ids, ratio=1.0)  # no padding


def train_principle_lm(path: Path, seed: int, steps: int):  # type: ignore[no-untyped-def]
    """A tiny LM that has learnt the principle: after "user <topics> assistant" 90% of the answer
    words are "yes" words; without "user", half are."""
    build_tiny_causal_lm(path, seed=seed)
    model, tok = (
        AutoModelForCausalLM.from_pretrained(path),
        AutoTokenizer.from_pretrained(path, padding_side="left"),
    )
    rng = random.Random(seed)

    def row() -> str:
        principled = rng.random() < 0.5
        topics = rng.choices(TOPICS, k=rng.randint(1, 3))
        answer = [rng.choice(YES if rng.random() < (0.9 if principled else 0.5) else NO) for _ in range(3)]
        return " ".join([PRINCIPLE] * principled + topics + ["assistant"] + answer)

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = tok([row() for _ in range(16)], return_tensors="pt", padding=True)
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), tok


def yes_mass(model, tok, ratio: float | None, seed: int) -> float:  # type: ignore[no-untyped-def]
    """Mean probability of the "yes" words at the first answer position on 16 held-out topic sets:
    under the plain prompt (ratio None) or linear alignment (ratio 0: the principled prompt);
    temperature 1 and top-p 1, so that the distributions compare as they are."""
    rng = random.Random(1000 + seed)
    topics = [" ".join(rng.choices(TOPICS, k=rng.randint(1, 3))) for _ in range(16)]
    principled = tok([f"{PRINCIPLE} {t} assistant" for t in topics], return_tensors="pt", padding=True)
    plain = tok([f"{t} assistant" for t in topics], return_tensors="pt", padding=True)
    with torch.no_grad():
        phi_0 = model(**plain).logits[:, -1]
        phi_p = model(**principled).logits[:, -1]
    logits = (
        phi_0 if ratio is None else linear_alignment_logits(phi_p, phi_0, ratio, temperature=1.0, top_p=1.0)
    )
    yes = tok.convert_tokens_to_ids(YES)
    return float(torch.softmax(logits, -1)[:, yes].sum(-1).mean())


def test_the_principle_consistent_continuation_gains_mass(tmp_path: Path) -> None:
    """Over 3 seeds (/tmp/ift/linear_alignment_effect.py) the "yes" mass goes plain < principled <
    aligned (ratio 2); here one seed."""
    model, tok = train_principle_lm(tmp_path / "lm", seed=0, steps=150)
    plain, principled, aligned = (yes_mass(model, tok, r, seed=0) for r in (None, 0.0, 2.0))
    assert plain < principled < aligned, (plain, principled, aligned)
