"""Preference files: the three shapes read into pairs, rankings into k(k-1)/2 pairs with ties
dropped and counted, and every bad record quarantined with its file:line and reason."""

from __future__ import annotations

import gzip
import json
from itertools import combinations

import pytest
from conftest import write_jsonl

from domainlm.align import records
from domainlm.align.demo import dense_ranks, judge, label, other_answers
from domainlm.align.evaluate import Verdicts
from domainlm.align.records import Preferences, ranking_pairs, read_preferences
from domainlm.errors import UserError


@pytest.mark.parametrize("k", [2, 3, 4, 7])
def test_a_ranking_of_k_gives_k_choose_2_pairs_each_the_right_way(k):
    completions = [f"reply {i}" for i in range(k)]
    ranks = list(range(k, 0, -1))  # the last completion is the best
    pairs, ties, identical = ranking_pairs(completions, ranks)
    assert len(pairs) == k * (k - 1) // 2 and ties == identical == 0
    rank = dict(zip(completions, ranks, strict=True))
    assert all(rank[better] < rank[worse] for better, worse in pairs)
    assert set(map(frozenset, pairs)) == set(map(frozenset, combinations(completions, 2)))


def test_ties_are_dropped_and_counted():
    # ranks 1, 2, 2, 3, 2: the three 2s tie with each other (3 pairs); 10 - 3 = 7 pairs left
    pairs, ties, identical = ranking_pairs(list("abcde"), [1, 2, 2, 3, 2])
    assert (len(pairs), ties, identical) == (7, 3, 0)
    assert len(pairs) + ties + identical == 5 * 4 // 2
    # the same text ranked twice (differently) teaches nothing: dropped, counted apart
    pairs, ties, identical = ranking_pairs(["x", "y", "x"], [1, 2, 3])
    assert (len(pairs), ties, identical) == (2, 0, 1)


def _read(path, into=None, source="s"):
    prefs = into or Preferences()
    read_preferences(path, source, prefs)
    return prefs


def test_the_three_shapes_and_their_counts(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "Sum 2+2", "completions": ["4", "5", "four", "22"], "ranking": [1, 3, 1, 4]},
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
        {"prompt": messages, "chosen": [{"role": "assistant", "content": "Hello."}],
         "rejected": [{"role": "assistant", "content": "Hello there, how are you today?"}]},
        # TRL's implicit prompt: the conversations' shared start
        {"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A1"}],
         "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A2"}]},
        {"prompt": "Name a color", "completion": "blue", "score": 0.9},
        {"prompt": "Name a color", "completion": "seven", "score": -1},
        {"prompt": "Name a color", "completion": "red", "score": 0.9},
        {"prompt": "Alone", "completion": "only one", "score": 1.0},
    ])
    prefs = _read(path)
    c = prefs.counts["s"]
    assert c["records"] == 8 and c["kept"] == 8 and c["quarantined"] == {}
    assert c["shapes"] == {"ranked": 1, "pair": 3, "scored": 4}
    # ranked: 6 combinations, 1 tie (4 and four); pairs: 3; scored: 3 combinations, 1 tie
    assert (c["pairs"], c["ties"], c["unpaired"]) == (5 + 3 + 2, 1 + 1, 1)
    by_prompt = {p.prompt: p for p in prefs.pairs}
    sys_pair = by_prompt[(("system", "Be brief."), ("user", "Hi?"))]
    assert sys_pair.chosen == "Hello." and sys_pair.messages[0]["role"] == "system"
    assert by_prompt[(("user", "Q"),)].chosen == "A1"
    color = [(p.chosen, p.rejected) for p in prefs.pairs if p.prompt == (("user", "Name a color"),)]
    assert sorted(color) == [("blue", "seven"), ("red", "seven")]
    assert prefs.best[(("user", "Sum 2+2"),)] == "4"
    assert all(":" in p.origin for p in prefs.pairs)


BAD_LINES = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "not_an_object"),
    (json.dumps({"hello": 1}), "unknown_shape"),
    (json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": None}), "unlabeled"),
    (json.dumps({"prompt": "p", "completions": ["a", "b"]}), "unlabeled"),
    (json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [1]}), "bad_ranking"),
    (json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]}), "bad_ranking"),
    (json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": ["1", 2]}), "bad_ranking"),
    (json.dumps({"prompt": "p", "completions": ["a"], "ranking": [1]}), "bad_field"),
    (json.dumps({"prompt": "p", "completions": ["a", 3], "ranking": [1, 2]}), "bad_field"),
    (json.dumps({"prompt": "  ", "completions": ["a", ""], "ranking": [1, 2]}), "empty_field"),
    (json.dumps({"prompt": "p", "chosen": "a"}), "missing_field"),
    (json.dumps({"chosen": "a", "rejected": "b"}), "missing_field"),
    (json.dumps({"prompt": 7, "chosen": "a", "rejected": "b"}), "bad_field"),
    (json.dumps({"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a",
                 "rejected": "b"}), "bad_field"),
    (json.dumps({"prompt": [{"role": "robot", "content": "x"}], "chosen": "a",
                 "rejected": "b"}), "bad_field"),
    (json.dumps({"prompt": "p", "chosen": [{"role": "user", "content": "a"}],
                 "rejected": "b"}), "bad_field"),
    (json.dumps({"prompt": "p", "completion": "a", "score": "high"}), "bad_score"),
    (json.dumps({"prompt": "p", "completion": "a"}), "bad_score"),
    ('{"prompt": "p", "completion": "a", "score": NaN}', "bad_score"),
    (json.dumps({"prompt": "\ud800", "chosen": "a", "rejected": "b"}), "invalid_utf8"),
    (json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "reference": 3}), "bad_field"),
    (json.dumps({"prompt": "p", "completions": ["a", "b"], "ranking": [1, 2],
                 "reference": " "}), "empty_field"),
]


def test_every_bad_record_is_quarantined_with_file_line_and_reason(tmp_path):
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})
    lines = [good] + [line for line, _ in BAD_LINES] + [good]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    prefs = _read(path)
    c = prefs.counts["s"]
    assert c["records"] == len(lines) == c["kept"] + sum(c["quarantined"].values())
    assert c["kept"] == 2 and len(prefs.pairs) == 2
    got = [(q["origin"], q["reason"].split(":")[1]) for q in prefs.quarantined]
    want = [(f"{path}:{i + 2}", reason) for i, (_, reason) in enumerate(BAD_LINES)]
    assert got == want
    assert all(q["detail"] and q["text"] for q in prefs.quarantined)
    assert all(q["source"] == "s" for q in prefs.quarantined)


def test_compressed_files_and_files_that_cannot_be_used(tmp_path):
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    assert len(_read(gz).pairs) == 1
    with pytest.raises(UserError, match="does not exist"):
        _read(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="is empty"):
        _read(tmp_path / "empty.jsonl")
    (tmp_path / "p.csv").write_text("a,b\n")
    with pytest.raises(UserError, match="jsonl"):
        _read(tmp_path / "p.csv")


def test_a_reference_is_the_judges_reply_and_never_paired(tmp_path):
    path = write_jsonl(tmp_path / "ref.jsonl", [
        {"prompt": "Q", "completions": ["x", "y", "z"], "ranking": [2, 1, 3], "reference": "R"},
        {"prompt": "Q", "chosen": "y", "rejected": "w", "reference": "later"},
        {"prompt": "P", "chosen": "c", "rejected": "d", "reference": "RP"},
        {"prompt": "S", "completion": "s1", "score": 1, "reference": "RS"},
        {"prompt": "S", "completion": "s2", "score": 2},
        {"prompt": "T", "completions": ["t1", "t2"], "ranking": [2, 1]},
    ])
    prefs = _read(path)
    q, p, s, t = ((("user", k),) for k in "QPST")
    # the first reference given wins; without one, the first top-ranked reply
    assert (prefs.best[q], prefs.best[p], prefs.best[s], prefs.best[t]) == ("R", "RP", "RS", "t2")
    assert not {"R", "later", "RP", "RS"} & {x for pr in prefs.pairs for x in (pr.chosen,
                                                                              pr.rejected)}
    assert prefs.counts["s"]["pairs"] == 3 + 1 + 1 + 1 + 1


def test_the_demo_labeler_can_keep_the_reference_out_of_the_pairs():
    ref = "returns the sum of the values"
    rec = label(ref, ["returns the sum", "opens a file"], rank_reference=False)
    assert rec["reference"] == ref and ref not in rec["completions"]
    assert rec["ranking"] == [1, 2]
    assert "reference" not in label(ref, ["returns the sum", "opens a file"])


def test_the_demo_labeler_ranks_by_rouge_with_the_reference_first():
    assert dense_ranks([0.5, 1.0, 0.5, 0.2]) == [2, 1, 2, 3]
    rec = label("returns the sum of the values", ["returns the sum", "opens a file",
                                                 "returns the sum"])
    assert rec["completions"][0] == "returns the sum of the values"
    assert rec["ranking"] == [1, 2, 3, 2]
    pairs, ties, _ = ranking_pairs(rec["completions"], rec["ranking"])
    assert ties == 1 and len(pairs) == 5
    assert all(w == "opens a file" or b.startswith("returns the sum of") for b, w in pairs)


def test_the_demo_labeler_ranks_answers_to_other_questions_like_any_reply():
    from domainlm.finetune.records import Example

    def ex(q, a):
        return Example("t", [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                       q)

    examples = [ex(f"q{i}", f"answer number {i}") for i in range(6)]
    picks = other_answers(examples, 2, seed=7)
    assert picks == other_answers(examples, 2, seed=7)  # seeded
    assert picks != other_answers(examples, 2, seed=8)
    for i, wrong in enumerate(picks):  # two distinct answers, never the example's own
        assert len(set(wrong)) == 2 and f"answer number {i}" not in wrong
    assert sorted(other_answers(examples, 9, seed=7)[0]) == [  # at most every other one
        f"answer number {i}" for i in range(1, 6)]
    assert other_answers(examples, 0, seed=7) == [[]] * 6
    assert other_answers(examples[:1], 2, seed=7) == [[]]
    # ranked by the judge among the samples: a wrong-kind reply below a near one
    ref = "`Lock()`"
    rec = label(ref, ["`Lock(x)`", "`Lk()`"], others=["Primitive lock objects."])
    assert rec["completions"][-1] == "Primitive lock objects."
    assert rec["ranking"][0] == 1 and rec["ranking"][1] < rec["ranking"][-1]


def test_the_judge_breaks_rouge_ties_by_characters():
    ref = "Return the absolute value of x."
    near, far = "Retrun absolte valeu.", "zzz qqq"  # both share no word with the reference
    assert judge(ref, near)[0] == judge(ref, far)[0] == 0.0
    assert judge(ref, near)[1] > judge(ref, far)[1]
    assert judge(ref, ref) == pytest.approx((1.0, 1.0))
    assert label(ref, [far, near])["ranking"] == [1, 3, 2]
    # word overlap decides before characters do
    assert judge(ref, "the value")[0] > 0 and judge(ref, "the value") > judge(ref, near)
    v = Verdicts()
    v.add(judge(ref, near), judge(ref, far))   # chrF decides a ROUGE-L tie
    v.add(judge(ref, far), judge(ref, "the value"))  # ROUGE-L decides
    v.add(judge(ref, far), judge(ref, far))    # equal on both: a tie
    v.add(0.5, 0.2)                            # plain scores still work
    assert (v.wins, v.ties, v.losses) == (2, 1, 1)


def test_prompt_keys_are_the_content():
    a = records.prompt_key((("user", "x"),))
    assert a == records.prompt_key((("user", "x"),)) != records.prompt_key((("user", "y"),))


def test_align_before_finetune_names_the_command(tmp_path):
    import yaml
    from click.testing import CliRunner

    from domainlm.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "x", "build_dir": str(tmp_path / "build"),
        "corpus": {"sources": [{"name": "s", "path": str(tmp_path)}]},
    }))
    result = CliRunner().invoke(main, ["align", "--recipe", str(path)])
    assert result.exit_code == 2 and "make finetune" in result.output
    assert "Traceback" not in result.output
    path.write_text(path.read_text() + "align:\n  sft_model: dpo\n")
    result = CliRunner().invoke(main, ["align", "--recipe", str(path)])
    assert result.exit_code == 2 and "is not a model to align" in result.output
