"""CoLoR: length-penalised losses, pair rules, readers, cached stages, the compressor, the recipe."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# ----- losses on hand-computed examples ---------------------------------------------------
def test_length_scale_is_the_gap_times_coef_clamped_at_one() -> None:
    from ctxzip.compressors.color.trainer import length_scale

    chosen = torch.tensor([10, 10, 30, 10])
    rejected = torch.tensor([50, 15, 10, 20])
    # 0.1 * 40 = 4; 0.1 * 5 = 0.5 -> 1; chosen longer -> negative -> 1; 0.1 * 10 = 1
    assert torch.allclose(length_scale(chosen, rejected), torch.tensor([4.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(length_scale(chosen, rejected, coef=0.5), torch.tensor([20.0, 2.5, 1.0, 5.0]))


def test_length_penalized_dpo_loss_sign_and_scale() -> None:
    from ctxzip.compressors.color.trainer import length_penalized_dpo_loss

    # chosen gains 1 nat over the reference, rejected loses 1: margin 2; beta 0.1
    pc, pr, rc, rr = (torch.tensor([v]) for v in (-10.0, -12.0, -11.0, -11.0))
    same_length, _, _ = length_penalized_dpo_loss(pc, pr, rc, rr, torch.tensor([5]), torch.tensor([5]), beta=0.1)
    assert same_length.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)  # -log sigmoid(0.2)
    # rejected 30 tokens longer: scale 0.1 * 30 = 3 -> -log sigmoid(0.6)
    longer, chosen_r, rejected_r = length_penalized_dpo_loss(pc, pr, rc, rr, torch.tensor([5]), torch.tensor([35]),
                                                             beta=0.1)
    assert longer.item() == pytest.approx(math.log1p(math.exp(-0.6)), abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.1) and rejected_r.item() == pytest.approx(-0.1)
    # the wrong preference (margin -2) costs more, and more again with the length scale
    wrong, _, _ = length_penalized_dpo_loss(pr, pc, rr, rc, torch.tensor([5]), torch.tensor([35]), beta=0.1)
    assert wrong.item() == pytest.approx(math.log1p(math.exp(0.6)), abs=1e-6)
    assert wrong.item() > math.log(2) > longer.item()


def test_length_penalized_orpo_loss_on_known_odds() -> None:
    from ctxzip.compressors.color.trainer import length_penalized_orpo_loss, log_odds_ratio

    # p(y_w) = 1/2 (odds 1) and p(y_l) = 1/4 (odds 1/3): log odds ratio = log 3
    mean_w, mean_l = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert log_odds_ratio(mean_w, mean_l).item() == pytest.approx(math.log(3), abs=1e-5)
    plain, scaled = length_penalized_orpo_loss(mean_w, mean_l, torch.tensor([10]), torch.tensor([12]))
    assert plain.item() == pytest.approx(math.log(4 / 3), abs=1e-5)  # -log sigmoid(log 3) = log(1 + 1/3)
    assert scaled.item() == pytest.approx(math.log(3), abs=1e-5)
    # rejected 20 tokens longer: scale 2 -> -log sigmoid(2 log 3) = log(1 + 1/9)
    penalised, _ = length_penalized_orpo_loss(mean_w, mean_l, torch.tensor([10]), torch.tensor([30]))
    assert penalised.item() == pytest.approx(math.log(10 / 9), abs=1e-5)
    # preferring the rejected one: the length scale makes the loss larger, log(1 + 9)
    wrong, _ = length_penalized_orpo_loss(mean_l, mean_w, torch.tensor([10]), torch.tensor([30]))
    assert wrong.item() == pytest.approx(math.log(10), abs=1e-5)
    # stable where a mean log-probability is ~0 (probability ~1)
    assert torch.isfinite(log_odds_ratio(torch.tensor([-1e-9]), torch.tensor([-3.0]))).all()


def test_config_refuses_unknown_loss() -> None:
    from ctxzip.compressors.color.trainer import ColorDPOConfig

    with pytest.raises(ValueError, match="color_loss"):
        ColorDPOConfig(output_dir="/tmp/x", color_loss="simpo")


# ----- pair construction rules -----------------------------------------------------------
def cand(text: str, tokens: int, success: bool, variant: str = "v") -> dict:
    return {"text": text, "tokens": tokens, "success": success, "variant": variant, "ids": list(range(tokens))}


def test_pairs_shortest_success_vs_longest_failure() -> None:
    from ctxzip.compressors.color.data import make_pair

    cands = [cand("a", 30, True), cand("b", 12, True), cand("c", 40, False), cand("d", 5, False)]
    pair = make_pair(cands)
    assert (pair["chosen"]["text"], pair["rejected"]["text"], pair["rule"]) == ("b", "c", "contrast")
    # the longest failure may be shorter than the chosen: still the pair (the length scale is then 1)
    pair = make_pair([cand("a", 30, True), cand("d", 5, False)])
    assert (pair["chosen"]["text"], pair["rejected"]["text"]) == ("a", "d")


def test_every_failure_pairs_with_the_shortest_success() -> None:
    from ctxzip.compressors.color.data import PairRules, passage_pairs

    cands = [cand("a", 30, False), cand("b", 12, True), cand("c", 20, False), cand("d", 5, False),
             cand("e", 9, True), cand("c", 20, False)]
    assert [(p["chosen"]["text"], p["rejected"]["text"]) for p in passage_pairs(cands)] == [("e", "a")]
    every = passage_pairs(cands, PairRules(rejected="every"))
    assert [(p["chosen"]["text"], p["rejected"]["text"]) for p in every] == [("e", "a"), ("e", "c"), ("e", "d")]
    assert {p["rule"] for p in every} == {"contrast"}
    wins = [cand("a", 30, True), cand("b", 12, True)]
    assert len(passage_pairs(wins, PairRules(rejected="every"))) == 1  # no failure: the all_success pair only
    assert passage_pairs([cand("a", 3, False)], PairRules(rejected="every")) == []
    with pytest.raises(ValueError, match="rejected"):
        PairRules(rejected="random")


def test_pairs_when_all_succeed_or_all_fail() -> None:
    from ctxzip.compressors.color.data import PairRules, make_pair

    wins = [cand("a", 30, True), cand("b", 12, True), cand("c", 20, True)]
    pair = make_pair(wins)
    assert (pair["chosen"]["text"], pair["rejected"]["text"], pair["rule"]) == ("b", "a", "all_success")
    assert make_pair(wins, PairRules(all_success="skip")) is None
    fails = [cand("a", 30, False), cand("b", 12, False)]
    assert make_pair(fails) is None  # the released code's "hard" setting
    pair = make_pair(fails, PairRules(all_failed="shortest_vs_longest"))
    assert (pair["chosen"]["text"], pair["rejected"]["text"], pair["rule"]) == ("b", "a", "all_failed")
    # equal lengths: first is shortest, last is longest (a stable sort's ends); same text: no pair
    pair = make_pair([cand("x", 8, True), cand("y", 8, True)])
    assert (pair["chosen"]["text"], pair["rejected"]["text"]) == ("x", "y")
    assert make_pair([cand("x", 8, True), cand("x", 9, True)]) is None
    assert make_pair([cand("x", 8, True)]) is None
    with pytest.raises(ValueError, match="all_failed"):
        PairRules(all_failed="keep")


def test_variants_parse_and_refuse_nonsense() -> None:
    from ctxzip.compressors.color.data import parse_variants

    v = parse_variants(["greedy", "words:0.25", "sample:0.8", "extract:2", "extract:1:3"])
    assert v[1].words_fraction == 0.25 and v[2].do_sample and v[2].temperature == 0.8
    assert (v[3].extract_sentences, v[3].draw, v[4].extract_sentences, v[4].draw) == (2, 0, 1, 3)
    assert [x.generates for x in v] == [True, True, True, False, False]
    for bad in (["words:2"], ["beam:4"], ["greedy", "greedy"], ["extract:0"], ["extract:x"], ["extract:1:-1"],
                ["group:1"], ["group:0:1"]):
        with pytest.raises(ValueError):
            parse_variants(bad)


# ----- readers on a toy corpus -----------------------------------------------------------
TOY = ["The pet of Alice Moreno is a parrot. Dictionaries preserve insertion order.",
       "Bruno Okafor works in the city of Oslo. A class may define a __contains__ method.",
       "Chloe Tanaka was born in the year 1948. The with statement wraps a block."]
TOY_QUERIES = ["What kind of animal is the pet of Alice Moreno?", "In which city does Bruno Okafor work?",
               "In which year was Chloe Tanaka born?"]


def test_dense_reader_retrieves_the_toy_corpus() -> None:
    from ctxzip.compressors.color.evaluation import DenseReader, retrieval_metrics

    reader = DenseReader()
    rankings = reader.rank(TOY, TOY_QUERIES)
    assert [r[0] for r in rankings] == [0, 1, 2]
    assert sorted(rankings[0]) == [0, 1, 2]
    assert retrieval_metrics([1, 2, 1, 5])["recall@1"] == 0.5
    assert retrieval_metrics([1, 2, 1, 6])["MRR"] == pytest.approx((1 + 0.5 + 1 + 1 / 6) / 4)


def test_dense_reader_embeds_each_text_once_and_the_same_as_alone() -> None:
    from ctxzip.compressors.color.evaluation import DenseReader

    reader, fresh = DenseReader(), DenseReader()
    together = reader.embed([TOY[0], TOY[1], TOY[0]])
    assert len(reader._embeddings) == 2
    assert torch.allclose(together[0], together[2])
    alone = torch.cat([fresh.embed([t]) for t in TOY[:2]])
    assert torch.allclose(together[:2], alone, atol=1e-5)
    assert reader.embed([]).numel() == 0


def test_extract_candidates_are_reproducible_sentence_draws() -> None:
    from ctxzip.compressors.color.data import extract, parse_variants, split_sentences

    passage = "First one. Second? Third!\nFourth here. Fifth."
    assert split_sentences(passage) == ["First one.", "Second?", "Third!", "Fourth here.", "Fifth."]
    one, other, two = parse_variants(["extract:1", "extract:1:1", "extract:2"])
    draws = {extract(passage, one, 0, f"p{i}") for i in range(12)}
    assert len(draws) > 1 and draws <= set(split_sentences(passage))  # one whole sentence, not always the same
    assert extract(passage, one, 0, "p0") == extract(passage, one, 0, "p0")  # reproducible
    picked = extract(passage, two, 0, "p0").split(" ")
    order = [s for s in split_sentences(passage) if s in extract(passage, two, 0, "p0")]
    assert len(order) == 2 and " ".join(order) == " ".join(picked)  # passage order kept
    assert any(extract(passage, one, 0, f"p{i}") != extract(passage, other, 0, f"p{i}") for i in range(8))
    singles = parse_variants([f"group:1:{d}" for d in range(5)])
    for pid in ("p3", "p4"):  # groups of one shuffle: five different sentences, then the first again
        assert sorted(extract(passage, v, 0, pid) for v in singles) == sorted(split_sentences(passage))
        assert extract(passage, parse_variants(["group:1:5"])[0], 0, pid) == extract(passage, singles[0], 0, pid)
    first, second = (split_sentences(extract(passage, v, 0, "p3")) for v in parse_variants(["group:2:0", "group:2:1"]))
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    assert extract("Only sentence.", two, 0, "p") == "Only sentence."


def test_extract_to_budget_spends_the_budget_on_the_best_sentences(tiny) -> None:
    from ctxzip.compressors.color.evaluation import extract_to_budget

    _, tokenizer = tiny()
    sentences = ["Alpha beta gamma delta.", "Rosa Sato likes amber.", "Epsilon zeta eta theta iota."]
    count = lambda t: len(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    best = extract_to_budget(sentences, [0.0, 2.0, 1.0], count(sentences[1]), tokenizer)
    assert tokenizer.decode(best) == sentences[1]
    for budget in (1, 3, count(" ".join(sentences[1:])) - 2, 200):
        ids = extract_to_budget(sentences, [0.0, 2.0, 1.0], budget, tokenizer)
        assert len(ids) <= budget and ids
    text = tokenizer.decode(extract_to_budget(sentences, [0.0, 2.0, 1.0], 200, tokenizer))
    assert text == " ".join(sentences)  # everything fits: passage order


def test_extractive_baselines_score_sentences_and_match_the_budget(tiny, one_thread) -> None:
    from ctxzip.compressors.color.evaluation import extractive_compressions, sentence_self_information

    model, tokenizer = tiny()
    sentences = ["The pet of Alice Moreno is a parrot.", "Dictionaries preserve insertion order."]
    scores = sentence_self_information(model, tokenizer, sentences)
    ids = tokenizer(sentences[0] + " " + sentences[1], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    first = len(tokenizer(sentences[0], add_special_tokens=False)["input_ids"])
    surprise = [-float(logprobs[i, t]) for i, t in enumerate(ids[1:])]
    assert scores[0] == pytest.approx(sum(surprise[: first - 1]) / (first - 1), rel=1e-4)
    assert scores[1] == pytest.approx(sum(surprise[first - 1:]) / (len(ids) - first), rel=1e-4)
    corpus = toy_corpus()
    budgets = {p["passage_id"]: 5 + i for i, p in enumerate(corpus.passages)}
    for scorer in ("lead", "self_information"):
        out = extractive_compressions(corpus, tokenizer, budgets, scorer, model)
        assert {pid: len(ids) for pid, ids in out.items()} == budgets
    lead = extractive_compressions(corpus, tokenizer, {p["passage_id"]: 200 for p in corpus.passages}, "lead")
    assert tokenizer.decode(lead["p0"]) == TOY[0]
    with pytest.raises(ValueError, match="needs the base model"):
        extractive_compressions(corpus, tokenizer, budgets, "self_information")
    with pytest.raises(ValueError, match="unknown extractive scorer"):
        extractive_compressions(corpus, tokenizer, budgets, "tfidf")


def test_table_reports_recall_with_wilson_intervals() -> None:
    from ctxzip.compressors.color.evaluation import RetrievalResult, markdown_table
    from ctxzip.eval.metrics import wilson_interval

    result = RetrievalResult("trained", "dense", 0.75, 0.9, 0.8, 3.2, 30.0, 200)
    low, high = wilson_interval(150, 200)
    assert result.as_row()["recall@1 95% CI"] == [low, high]
    assert result.as_row()["recall@5 95% CI"] == list(wilson_interval(180, 200))
    table = markdown_table([result])
    assert f"| 0.750 [{low:.2f}, {high:.2f}] |" in table and "| 3.20x |" in table



def test_paired_difference_resamples_queries_and_refuses_other_queries() -> None:
    from ctxzip.compressors.color.evaluation import RetrievalResult, paired_difference

    def result(name: str, hits: list[int]) -> RetrievalResult:
        return RetrievalResult(name, "dense", sum(hits) / len(hits), 1.0, 1.0, 4.0, 20.0, len(hits), tuple(hits))

    same = [1, 0] * 100
    assert paired_difference(result("trained", same), result("extract", same)) == (0.0, 0.0, 0.0)  # no discordance
    better = [1] * 30 + same[30:]  # the trained corpus wins 15 queries and loses none
    difference, low, high = paired_difference(result("trained", better), result("extract", same))
    assert difference == pytest.approx(0.075) and 0 < low < difference < high < 0.15
    unpaired = (0.075 - 1.96 * (0.575 * 0.425 / 200 + 0.5 * 0.5 / 200) ** 0.5)  # two independent proportions
    assert unpaired < 0 < low  # pairing separates what the two Wilson intervals would call a tie
    with pytest.raises(ValueError, match="same queries"):
        paired_difference(result("trained", better), result("extract", same[:100]))


def test_fact_sentence_oracle_needs_every_needle() -> None:
    from ctxzip.compressors.color.data import RetrievalCorpus
    from ctxzip.compressors.color.evaluation import ORACLE, fact_sentence_compressions
    from ctxzip.compressors.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-random-llama")
    passages = [{"passage_id": "a", "passage": TOY[0], "window": 0}, {"passage_id": "b", "passage": TOY[1], "window": 0}]
    queries = [{"query_id": "qa", "query": "pet?", "gold_id": "a", "window": 0, "needle": "The pet of Alice Moreno is a parrot."},
               {"query_id": "qb", "query": "city?", "gold_id": "b", "window": 0, "needle": "Bruno Okafor works in Oslo."}]
    oracle = fact_sentence_compressions(RetrievalCorpus(passages, queries, 2), tokenizer)[ORACLE]
    assert tokenizer.decode(oracle["a"]) == queries[0]["needle"] and set(oracle) == {"a", "b"}
    del queries[1]["needle"]
    assert fact_sentence_compressions(RetrievalCorpus(passages, queries, 2), tokenizer) == {}


def test_lm_reader_ranks_by_id_logprob_and_refuses_a_corpus_too_long(tiny, one_thread) -> None:
    from ctxzip.compressors.color.evaluation import LMReader
    from ctxzip.compressors.errors import ContextTooLongError

    model, tokenizer = tiny()
    reader = LMReader(model, tokenizer)
    rankings = reader.rank(TOY, TOY_QUERIES)
    assert len(rankings) == 3 and all(sorted(r) == [0, 1, 2] for r in rankings)
    assert reader.rank(TOY, TOY_QUERIES) == rankings  # deterministic
    # scores = teacher-forced log-probability of each id after corpus + query, read from one shared cache:
    # the same as a full forward pass without any cache
    prefix = reader.corpus_ids(TOY)
    query = reader.middle + reader._encode(TOY_QUERIES[0]) + reader.tail
    answers = reader._answer_ids(3)
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        scores = reader._score(cache, len(prefix), query, answers, torch.device("cpu"))
        for i in (0, 2):
            full = torch.tensor([prefix + query + answers[i]])
            logprobs = model(input_ids=full).logits[0].float().log_softmax(-1)
            start = len(prefix) + len(query)
            direct = sum(float(logprobs[start - 1 + j, t]) for j, t in enumerate(answers[i]))
            assert scores[i] == pytest.approx(direct, abs=1e-3)
    assert rankings[0] == sorted(range(3), key=lambda i: (-scores[i], i))
    with pytest.raises(ContextTooLongError, match="corpus_size"):
        LMReader(model, tokenizer, max_positions=64).rank(TOY, TOY_QUERIES)


def test_lm_reader_and_dense_reader_share_the_labels_interface(tiny, one_thread, tmp_path) -> None:
    from ctxzip.compressors.color.data import RetrievalCorpus, Variant, label_candidates
    from ctxzip.compressors.color.evaluation import LMReader

    corpus = toy_corpus()
    candidates = [{"passage_id": p["passage_id"], "variant": "greedy", "text": p["passage"][:40], "ids": [1],
                   "tokens": 1} for p in corpus.passages]
    model, tokenizer = tiny()
    labels = label_candidates(corpus, candidates, [Variant("greedy")], LMReader(model, tokenizer), tmp_path)
    assert {r["passage_id"] for r in labels} == {"p0", "p1", "p2"}
    assert all(isinstance(r["success"], bool) and 1 <= r["gold_rank"] <= 3 for r in labels)
    assert isinstance(corpus, RetrievalCorpus)


# ----- cached stages resume --------------------------------------------------------------
def toy_corpus():
    from ctxzip.compressors.color.data import _windowed

    passages = [{"passage_id": f"p{i}", "passage": t} for i, t in enumerate(TOY)]
    queries = [{"query_id": f"q{i}", "query": q, "gold_id": f"p{i}"} for i, q in enumerate(TOY_QUERIES)]
    return _windowed(passages, queries, corpus_size=2, fingerprint="toy")


class Boom(Exception):
    pass


def test_candidates_stage_resumes_after_a_crash(tmp_path) -> None:
    from ctxzip.compressors.color.data import Variant, generate_candidates

    corpus, variants = toy_corpus(), [Variant("greedy"), Variant("sample:1", do_sample=True)]
    calls = []

    def writer(passages, variant, crash_after=None):
        calls.append((variant.name, [p["passage_id"] for p in passages]))
        if crash_after is not None and len(calls) > crash_after:
            raise Boom
        return [([7] * (i + 1), f"{variant.name} {p['passage_id']}") for i, p in enumerate(passages)]

    with pytest.raises(Boom):
        generate_candidates(corpus, variants, lambda p, v: writer(p, v, crash_after=3), tmp_path, {"w": 1},
                            batch_size=2)
    done = len(list((tmp_path / "candidates").glob("part-*.jsonl")))
    assert done == 2
    calls.clear()
    records = generate_candidates(corpus, variants, writer, tmp_path, {"w": 1}, batch_size=2)
    assert len(records) == 6 and calls == [("sample:1", ["p1", "p2"])]  # only the missing batch
    assert {(r["passage_id"], r["variant"]) for r in records} == {(f"p{i}", v.name) for i in range(3) for v in variants}
    calls.clear()
    assert generate_candidates(corpus, variants, writer, tmp_path, {"w": 1}, batch_size=2) == records
    assert calls == []  # fully cached
    generate_candidates(corpus, variants, writer, tmp_path, {"w": 2}, batch_size=2)
    assert len(calls) == 4  # other writer settings: all recomputed (3 batches, one with both variants)


def test_labels_and_pairs_stages_resume(tmp_path) -> None:
    from ctxzip.compressors.color.data import Variant, label_candidates, make_pairs

    corpus, variants = toy_corpus(), [Variant("a"), Variant("b")]
    candidates = [{"passage_id": p["passage_id"], "variant": v.name, "text": f"{v.name}:{p['passage']}",
                   "ids": [1] * (3 if v.name == "a" else 9), "tokens": 3 if v.name == "a" else 9}
                  for v in variants for p in corpus.passages]

    class Reader:  # variant "b" keeps every passage retrievable, "a" loses all but lone ones
        name = "fake"
        calls = 0
        crash = False

        def rank(self, passages, queries):
            Reader.calls += 1
            if Reader.crash and Reader.calls > 1:
                raise Boom
            out = []
            for i in range(len(queries)):
                others = [j for j in range(len(passages)) if j != i]
                out.append([i, *others] if passages[0].startswith("b:") else [*others, i])
            return out

    Reader.crash = True
    with pytest.raises(Boom):
        label_candidates(corpus, candidates, variants, Reader(), tmp_path)
    Reader.crash, Reader.calls = False, 0
    labels = label_candidates(corpus, candidates, variants, Reader(), tmp_path)
    assert Reader.calls == 3  # 2 variants x 2 windows, one was cached before the crash
    success = {(r["passage_id"], r["variant"]): r["success"] for r in labels}
    assert success == {("p0", "a"): False, ("p1", "a"): False, ("p2", "a"): True,
                       ("p0", "b"): True, ("p1", "b"): True, ("p2", "b"): True}
    prompts = []

    def prompt(passage):
        prompts.append(passage["passage_id"])
        return "PROMPT " + passage["passage_id"], [5, 6]

    pairs = make_pairs(corpus, candidates, labels, prompt, [2], "</s>", tmp_path)
    assert set(pairs.column_names) >= {"prompt", "chosen", "rejected", "prompt_ids", "chosen_ids", "rejected_ids"}
    assert pairs[0]["chosen_ids"][-1] == 2 and pairs[0]["chosen"].endswith("</s>")
    assert len(prompts) == len(pairs) == 3
    rules = {row["passage_id"]: (row["rule"], row["chosen_variant"], row["rejected_variant"]) for row in pairs}
    assert rules == {"p0": ("contrast", "b", "a"), "p1": ("contrast", "b", "a"), "p2": ("all_success", "a", "b")}
    prompts.clear()
    again = make_pairs(corpus, candidates, labels, prompt, [2], "</s>", tmp_path)
    assert prompts == [] and again.to_list() == pairs.to_list()  # cached


def test_labels_against_original_passages_refuse_a_win_by_everyone_losing(tmp_path) -> None:
    from ctxzip.compressors.color.data import Variant, label_candidates

    corpus = toy_corpus()  # windows: (p0, p1) and (p2)
    facts = {p["passage_id"]: p["passage"].split(". ")[0] for p in corpus.passages}
    fillers = {p["passage_id"]: p["passage"].split(". ")[1] for p in corpus.passages}
    candidates = [{"passage_id": pid, "variant": "fact", "text": text, "ids": [1], "tokens": 1}
                  for pid, text in facts.items()]
    candidates += [{"passage_id": pid, "variant": "filler", "text": text, "ids": [1], "tokens": 1}
                   for pid, text in fillers.items()]
    variants = [Variant("fact"), Variant("filler")]

    class Reader:  # a passage scores by the query's words it holds; ties go to the first passage
        name = "words"
        ranked = []

        def rank(self, passages, queries):
            Reader.ranked.append(list(passages))
            words = [set(q.lower().rstrip("?").split()) for q in queries]
            return [sorted(range(len(passages)), key=lambda i: (-len(w & set(passages[i].lower().split())), i))
                    for w in words]

    def success(negatives):
        labels = label_candidates(corpus, candidates, variants, Reader(), tmp_path / negatives, negatives=negatives)
        return {(r["passage_id"], r["variant"]): r["success"] for r in labels}

    compressed = success("compressed")
    assert compressed[("p0", "filler")]  # every passage lost its fact: p0 ranks first by the tie alone
    Reader.ranked.clear()
    original = success("original")
    assert original == {("p0", "fact"): True, ("p1", "fact"): True, ("p2", "fact"): True,
                        ("p0", "filler"): False, ("p1", "filler"): False, ("p2", "filler"): True}
    assert [facts["p0"], TOY[1]] in Reader.ranked and [TOY[0], facts["p1"]] in Reader.ranked
    with pytest.raises(ValueError, match="negatives"):
        label_candidates(corpus, candidates, variants, Reader(), tmp_path, negatives="others")


def _matches(template: str, text: str) -> bool:
    """Whether ``text`` is ``template`` with its ``{slots}`` filled."""
    import re

    pattern = re.escape(template)
    for slot in ("key", "attr", "value"):
        pattern = pattern.replace(re.escape("{" + slot + "}"), ".+")
    return re.fullmatch(pattern, text) is not None


def test_offline_corpus_stage_is_cached_and_has_one_gold_per_query(tmp_path) -> None:
    from ctxzip.compressors.color.data import offline_corpus
    from ctxzip.compressors.models import load_tokenizer
    from ctxzip.data.mixture import MULTI_FACT
    from ctxzip.data.tasks import FIRST_NAMES, LAST_NAMES

    tokenizer = load_tokenizer("tiny-random-llama")
    corpus = offline_corpus(tokenizer, num_passages=6, passage_tokens=48, corpus_size=4, cache_dir=tmp_path)
    assert len(corpus.passages) == 6 and [len(w) for w in corpus.windows] == [4, 2]
    people = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    for q in corpus.queries:
        (name,) = [n for n in people if n in q["query"]]
        assert [p["passage_id"] for p in corpus.passages if name in p["passage"]] == [q["gold_id"]]
        assert q["answer"] in corpus.passage(q["gold_id"])["passage"]
        assert q["needle"] in corpus.passage(q["gold_id"])["passage"]
    # held out: the test split words its facts and queries only with the family's held-out templates
    held = offline_corpus(tokenizer, num_passages=8, passage_tokens=48, split="test", source="stdlib")
    for split, rows in (("train", corpus.queries), ("test", held.queries)):
        for q in rows:
            assert any(_matches(t, q["needle"]) for t in MULTI_FACT.needles.of(split)), q["needle"]
            assert not any(_matches(t, q["needle"]) for t in MULTI_FACT.needles.of("test" if split == "train" else "train"))
            assert any(_matches(t, q["query"]) for t in MULTI_FACT.questions.of(split)), q["query"]
    part = next((tmp_path / "corpus-train").glob("part-*.jsonl"))
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    rows[0]["passage"] = "EDITED " + rows[0]["passage"]
    part.write_text("".join(json.dumps(r) + "\n" for r in rows))
    again = offline_corpus(tokenizer, num_passages=6, passage_tokens=48, corpus_size=4, cache_dir=tmp_path)
    assert again.passages[0]["passage"].startswith("EDITED ")  # read from the cache, not rebuilt
    other = offline_corpus(tokenizer, num_passages=5, passage_tokens=48, corpus_size=4, cache_dir=tmp_path)
    assert not other.passages[0]["passage"].startswith("EDITED ")  # other settings: rebuilt



def test_offline_corpus_deals_families_in_turn_with_keys_unique_in_each_window() -> None:
    from ctxzip.compressors.color.data import offline_corpus
    from ctxzip.compressors.color.script_args import ColorScriptArguments
    from ctxzip.compressors.models import load_tokenizer
    from ctxzip.data.mixture import FAMILIES, MIXTURE_FAMILIES

    tokenizer = load_tokenizer("tiny-random-llama")
    corpus = offline_corpus(tokenizer, 30, 48, corpus_size=8, families=MIXTURE_FAMILIES)
    assert [q["family"] for q in corpus.queries] == [MIXTURE_FAMILIES[i % 6] for i in range(30)]
    for q in corpus.queries:
        family = FAMILIES[q["family"]]
        assert any(_matches(t, q["needle"]) for t in family.needles.of("train")), q["needle"]
        assert any(_matches(t, q["query"]) for t in family.questions.of("train")), q["query"]
        assert q["needle"] in corpus.passage(q["gold_id"])["passage"] and q["answer"] in q["needle"]
    for window in corpus.windows:  # a query's key is in its gold passage only, within the window it is asked in
        for q in corpus.queries_of(window[0]["window"]):
            (key,) = [k for k in FAMILIES[q["family"]].keys if k in q["query"]]
            assert [p["passage_id"] for p in window if key in p["passage"]] == [q["gold_id"]], key
    with pytest.raises(ValueError, match="retrieval families"):
        offline_corpus(tokenizer, 4, 48, families=["continuation"])
    with pytest.raises(ValueError, match="eval_families"):
        ColorScriptArguments(eval_families=["multi_facts"])

# ----- datasets and errors ---------------------------------------------------------------
def test_hub_or_local_dataset_and_missing_columns(tmp_path) -> None:
    from ctxzip.compressors.color.data import load_corpus

    good = tmp_path / "corpus.jsonl"
    good.write_text("".join(json.dumps({"passage_id": i, "passage": t, "query": q, "gold_id": i}) + "\n"
                            for i, (t, q) in enumerate(zip(TOY, TOY_QUERIES))))
    corpus = load_corpus(str(good), str(good), corpus_size=2)
    assert len(corpus.passages) == 3 and len(corpus.queries) == 3
    assert all(corpus.passage(q["gold_id"])["window"] == q["window"] for q in corpus.queries)
    bad = tmp_path / "queries.jsonl"
    bad.write_text(json.dumps({"question": "x?", "gold": 1}) + "\n")
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['query', 'gold_id'\].*question"):
        load_corpus(str(good), str(bad))
    orphan = tmp_path / "orphan.jsonl"
    orphan.write_text(json.dumps({"query": "x?", "gold_id": "nope"}) + "\n")
    with pytest.raises(ValueError, match="gold_id 'nope'"):
        load_corpus(str(good), str(orphan))


def test_passage_longer_than_the_context_is_refused(tiny, one_thread) -> None:
    from ctxzip.compressors import ColorCompressor, ColorConfig
    from ctxzip.compressors.color.data import _windowed
    from ctxzip.compressors.color.pipeline import check_passages
    from ctxzip.compressors.errors import ContextTooLongError

    model, tokenizer = tiny(max_position_embeddings=96)
    compressor = ColorCompressor(ColorConfig(max_new_tokens=8), model).use_tokenizer(tokenizer)
    long_ids = tokenizer(" ".join(TOY * 4), add_special_tokens=False)["input_ids"]
    with pytest.raises(ContextTooLongError, match="96"):
        compressor.generate([long_ids])
    corpus = _windowed([{"passage_id": "long-1", "passage": " ".join(TOY * 4)}], [], 1, "x")
    with pytest.raises(ContextTooLongError, match="long-1"):
        check_passages(corpus, tokenizer, ColorConfig(max_new_tokens=8), 96)


# ----- the compressor --------------------------------------------------------------------
def test_text_memory_is_read_by_the_base_model_with_lora_off(tiny, one_thread, tmp_path) -> None:
    from ctxzip.compressors import ColorCompressor, ColorConfig, CompressedLM, Memory

    model, tokenizer = tiny()
    compressor = ColorCompressor(ColorConfig(max_new_tokens=5), model).use_tokenizer(tokenizer).eval()
    with torch.no_grad():
        for name, p in compressor.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)  # the writer now differs from the base model
    clm = CompressedLM(compressor, tokenizer)
    memory = clm.compress([TOY[0], TOY[1][:30]])
    assert memory.kind == "text" and memory.batch_size == 2 and len(memory.texts) == 2
    assert memory.slots == 5 and memory.source_tokens[0] > memory.source_tokens[1]
    assert memory.ratio == pytest.approx(sum(memory.source_tokens) / 10)
    row = memory.select(0)
    prompt = torch.tensor([clm.prompt_ids("Who?")])
    with compressor.reading(row), torch.no_grad():
        step = compressor.decoder_forward(row, prompt, torch.ones_like(prompt), use_cache=False)
    plain, _ = tiny()
    template = torch.tensor([clm.layout.prefix_ids])  # the text sits where the context would
    with torch.no_grad():
        expected = plain(torch.cat([template, row.tensors["input_ids"], prompt], dim=1)).logits[:, -prompt.shape[1]:]
    assert torch.allclose(step.logits, expected, atol=1e-5)  # base model, LoRA disabled, prompt positions only
    assert step.memory_tokens == [template.shape[1] + row.slots]
    assert isinstance(clm.generate("Who?", memory=row, max_new_tokens=3), str)
    memory.save(tmp_path / "m.mem")
    assert Memory.load(tmp_path / "m.mem").texts == memory.texts
    clm.save_pretrained(tmp_path / "saved")
    again = CompressedLM.from_pretrained(tmp_path / "saved")
    assert again.compress(TOY[0]).texts == clm.compress(TOY[0]).texts  # the trained LoRA came back


def test_eval_runs_a_saved_color_folder_on_the_passage_retrieval_task(tiny, one_thread, tmp_path) -> None:
    """``python -m ctxzip.eval`` compresses each passage of the corpus on its own (CoLoR's unit), lays the
    rewrites out like the task's corpus, and the base LM answers the passage ID from that text."""
    from ctxzip.compressors import ColorCompressor, ColorConfig, CompressedLM
    from ctxzip.eval.__main__ import main

    model, tokenizer = tiny()
    compressor = ColorCompressor(ColorConfig(max_new_tokens=6), model).use_tokenizer(tokenizer).eval()
    CompressedLM(compressor, tokenizer).save_pretrained(tmp_path / "color")
    out = tmp_path / "run"
    assert main(["--compressor", str(tmp_path / "color"), "--tasks", "passage_retrieval", "--context-length", "300",
                 "--num-samples", "1", "--no-progress", "--output-dir", str(out)]) == 0
    rows = {r["method"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert set(rows) == {"color", "full_context", "no_context", "truncation"}
    color = rows["color"]
    # at most 6 tokens per rewritten passage + the ID layout, against the whole corpus
    assert color["achieved_ratio"] > 1.5 and color["context_tokens"] > 200
    assert color["answer"].isdigit() and "Reply with its ID only" in color["question"]


# ----- the recipe ------------------------------------------------------------------------
def test_recipe_one_step_on_the_tiny_model(tmp_path) -> None:
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "recipes/configs/color_dpo/quickstart.yaml"), "--model_name_or_path", "tiny-random-llama",
            "--num_train_passages", "4", "--num_eval_passages", "2", "--passage_tokens", "40", "--corpus_size", "2",
            "--candidate_variants", "sample:1.0", "extract:1", "--label_reader", "lm", "--eval_readers", "lm",
            "--pairs_all_failed", "shortest_vs_longest", "--max_new_tokens", "6", "--max_steps", "1",
            "--per_device_train_batch_size", "2", "--logging_steps", "1", "--length_probe_steps", "1",
            "--length_probe_max_new_tokens", "4", "--warmup_steps", "0", "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "color_dpo.py"), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for row in ("uncompressed", "trained", "untrained", "extractive (lead)", "extractive (self_information)",
                "oracle (the fact sentence)"):
        assert f"| {row} | lm |" in result.stdout, row
    assert "| lm | extractive (self_information) | " in result.stdout  # the paired comparison table
    rows = {r["corpus"]: r for r in json.loads((out / "color_eval.json").read_text())}
    assert "trained minus this, recall@1" not in rows["trained"]
    for row in ("uncompressed", "untrained", "extractive (lead)"):
        low, high = rows[row]["trained minus this, 95% CI"]
        assert low <= rows[row]["trained minus this, recall@1"] <= high
        assert rows[row]["trained minus this, recall@1"] == pytest.approx(rows["trained"]["recall@1"] - rows[row]["recall@1"])
    assert "length/policy_compressed" in result.stdout + result.stderr
    for name in ("compressor_config.json", "adapter_model.safetensors", "README.md", "color_eval.json"):
        assert (out / name).is_file(), name
    assert "recall@1" in (out / "README.md").read_text()
    for stage in ("corpus-train", "candidates", "labels", "pairs", "eval-untrained"):
        assert json.loads((out / "color_data" / stage / "stage.json").read_text())["complete"], stage
    from ctxzip.compressors import CompressedLM

    clm = CompressedLM.from_pretrained(out)
    assert clm.compressor.compressor_type == "color"
    assert clm.compress(TOY[0]).kind == "text"


def test_completion_log_probs_score_only_the_completions_like_the_full_logits(tiny, one_thread) -> None:
    from ctxzip.compressors.color.trainer import completion_log_probs

    model, _ = tiny()
    ids = torch.randint(3, 200, (3, 12))
    labels = ids.clone()
    for row, prompt in enumerate((7, 5, 9)):  # prompts of different lengths, completions to the end
        labels[row, :prompt] = -100
    labels[2, -2:] = -100  # padding after a completion
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    with torch.no_grad():
        per_token, _ = completion_log_probs(model, kwargs, labels)
        logprobs = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    expected = logprobs.gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0].masked_fill(labels[:, 1:] == -100, 0)
    assert per_token.shape == (3, 11)
    torch.testing.assert_close(per_token, expected, rtol=1e-4, atol=1e-5)


def test_trainer_dpo_step_starts_at_log2_and_trains_only_lora(tiny, one_thread, tmp_path) -> None:
    import datasets

    from ctxzip.compressors import ColorConfig
    from ctxzip.compressors.color.trainer import ColorDPOConfig, ColorDPOTrainer

    model, tokenizer = tiny()
    rows = [{"prompt_ids": [5, 6, 7, 8], "chosen_ids": [9, 10, 2], "rejected_ids": [11, 12, 13, 14, 15, 2]},
            {"prompt_ids": [5, 6, 8], "chosen_ids": [21, 2], "rejected_ids": [22, 23, 24, 2]}]
    args = ColorDPOConfig(output_dir=str(tmp_path), color_loss="dpo", beta=0.1, max_steps=1, logging_steps=1,
                          per_device_train_batch_size=2, warmup_steps=0, save_strategy="no", use_cpu=True,
                          length_probe_steps=1, length_probe_max_new_tokens=3, disable_tqdm=True)
    trainer = ColorDPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                              processing_class=tokenizer, peft_config=ColorConfig().lora_config(),
                              length_probe=[[5, 6, 7]])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = trainer.state.log_history[0]
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA starts at zero: policy == reference
    assert logs["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert logs["length/chosen"] == pytest.approx(2.5) and logs["length/rejected"] == pytest.approx(5.0)
    assert logs["length/scale"] == 1.0 and "length/policy_compressed" in logs
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    trained = trainer.trained_state_dict()
    assert trained and all("lora_" in k for k in trained)


def test_cpu_only_machine_runs_the_trainer_on_cpu(tmp_path, monkeypatch) -> None:
    """Under DeepSpeed on a CPU-only machine, accelerate counts one process per rank unless the
    arguments say CPU; the config says so itself where no GPU exists."""
    from ctxzip.compressors.color.trainer import ColorDPOConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ColorDPOConfig(output_dir=str(tmp_path)).use_cpu is True


def test_process_local_models_switch_off_zero3_init_and_restore_it() -> None:
    from transformers.integrations import deepspeed as hf_deepspeed
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    from ctxzip.trainers.export import process_local_models

    config = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        with process_local_models():
            assert not hf_deepspeed.is_deepspeed_zero3_enabled()
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    del config
