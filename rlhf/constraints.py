"""The instruction-following task of the real-model demo: real prompts with verifiable constraints,
and the hidden gold judge of its simulated labeler.

The task follows InstructGPT's "follows explicit constraints in the instruction" labeler metadata
(Ouyang et al. 2022, table 3): real instructions from ``shared/data`` (AlpacaEval's 805, the
self-instruct seed tasks, MT-Bench's first turns with a reference answer) get one or two
constraints a program can check appended, e.g.

    How do I wrap a present neatly?

    Answer in at most 40 words. Use the word "ribbon" in your answer.

:data:`KINDS` lists the constraints; :func:`Constraint.check` is each one's checker.

The gold score (what the simulated labeler prefers; the reward model never sees it)::

    gold = met * relevance * fluency * (1 - repetition)^2 * substance * (1 - echo)      each in [0, 1]

* ``met``: the share of the prompt's constraints the response meets.
* ``relevance``: TF-IDF cosine (content words, less the words a constraint dictates) between the
  response and the task's topic (the instruction plus its reference answer, which the policy
  never sees), rescaled between two
  anchors measured on the data: an independent answer to the same instruction (self-instruct's
  own outputs for the AlpacaEval instructions it shares, 1.0) and an answer to another
  instruction (0.0).
* ``fluency``: SLOR (per-word trigram log-prob minus unigram log-prob; Lau et al. 2015) under a
  Kneser-Ney word trigram LM of reference answers and other English text in ``shared/data``,
  rescaled between real answers (1.0) and the same words shuffled (0.0), as in
  :class:`rlhf.judge.GoldJudge`.
* ``repetition``: the share of token trigrams that repeat an earlier one; squared, so that one
  sentence said four times (repetition 0.63) keeps 14 %, not 37 %, while real answers (0.03 on
  average) lose little.
* ``substance``: min(1, words / min_words), ``min_words`` = 12, or half a word limit below 24:
  an empty or three-word answer meets "do not use the word X" and "at most 40 words" but says
  nothing.
* ``echo``: the share of the response's word 4-grams found in the prompt: repeating the
  instruction (with its required words and phrase) is not answering it.

``relevance * fluency * (1 - repetition)^2 * substance * (1 - echo)`` is the *relevance-and-
fluency term* the demo reports beside the constraint rate. Dropping content to meet a
constraint costs substance and relevance; stuffing required words costs fluency and repetition;
copying the prompt costs echo. ``tests/test_constraints.py`` holds the gaming attempts tried and
what each scores.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from rlhf.errors import DataError
from rlhf.evaluate import repeated_ngram_share
from rlhf.judge import NGramLM, default_data_dir, tokenize

# -------------------------------------------------------------------------------- constraints

_WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?")
_BULLET = re.compile(r"^\s*[-*\u2022]\s+\S")
END_PHRASES = ("Hope this helps!", "That is all.", "Thanks for asking!", "I hope you find this useful.")
START_WORDS = ("Sure", "Yes", "Well", "Certainly", "Here")

STOPWORDS = frozenset("""a about above after again against all am an and any are as at be because been before being
below between both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just let me more most my myself no nor not now of
off on once only or other our ours ourselves out over own same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up very was we were what when where which while
who whom why will with would you your yours yourself yourselves also may might must shall one two three many much
like use used using make made way get got well even still yet etc e g ie eg new good""".split())


def words(text: str) -> list[str]:
    """Words as the checkers count them: runs of letters/digits (one inner apostrophe)."""
    return _WORD.findall(text)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", text, re.IGNORECASE) is not None


def _strip_end(s: str) -> str:
    return s.strip().strip("\"'*_ ").rstrip(".!?").strip().lower()


@dataclass(frozen=True)
class Constraint:
    """One verifiable constraint: ``kind`` (see :data:`KINDS`) and its argument."""

    kind: str
    arg: str = ""

    def text(self) -> str:
        """The sentence appended to the instruction."""
        return {
            "max_words": f"Answer in at most {self.arg} words.",
            "include_word": f'Use the word "{self.arg}" in your answer.',
            "avoid_word": f'Do not use the word "{self.arg}".',
            "bullets": f'Answer with exactly {self.arg} bullet points, each on its own line starting with "- ".',
            "end_with": f'End your answer with the phrase "{self.arg}"',
            "start_with": f'Start your answer with the word "{self.arg}".',
            "no_commas": "Do not use any commas.",
            "lowercase": "Write your whole answer in lowercase letters.",
        }[self.kind]

    def check(self, response: str) -> bool:
        """Whether ``response`` meets the constraint (the checker; see the module docstring)."""
        if self.kind == "max_words":
            return len(words(response)) <= int(self.arg)
        if self.kind == "include_word":
            return _has_word(response, self.arg)
        if self.kind == "avoid_word":
            return not _has_word(response, self.arg)
        if self.kind == "bullets":
            return sum(1 for line in response.splitlines() if _BULLET.match(line)) == int(self.arg)
        if self.kind == "end_with":
            return _strip_end(response).endswith(_strip_end(self.arg)) and bool(_strip_end(self.arg))
        if self.kind == "start_with":
            first = words(response.lstrip(" \t\n\"'*#"))[:1]
            return bool(first) and first[0].lower() == self.arg.lower()
        if self.kind == "no_commas":
            return "," not in response
        if self.kind == "lowercase":
            return any(c.isalpha() for c in response) and response == response.lower()
        raise ValueError(f"unknown constraint kind {self.kind!r}")

    def to_record(self) -> dict:
        return {"kind": self.kind, "arg": self.arg}


KINDS = ("max_words", "include_word", "avoid_word", "bullets", "end_with", "start_with", "no_commas", "lowercase")
# the demo's default mix leaves out "lowercase": its reward model (MiniLM) lower-cases its input and
# cannot see case
DEFAULT_KINDS = ("max_words", "include_word", "avoid_word", "bullets", "end_with", "start_with", "no_commas")
# pairs that contradict each other or make an odd request
_CLASH = {frozenset(p) for p in (("bullets", "start_with"), ("bullets", "end_with"), ("include_word", "avoid_word"),
                                  ("bullets", "max_words"))}


# -------------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Task:
    """One instruction with its reference answer and the constraints appended to it."""

    id: str
    source: str  # alpaca-eval | self-instruct | mt-bench
    instruction: str
    reference: str
    constraints: tuple[Constraint, ...] = ()

    @property
    def prompt(self) -> str:
        """What the user asks: the instruction, a blank line, the constraints."""
        return self.instruction.strip() + "\n\n" + " ".join(c.text() for c in self.constraints)

    def met(self, response: str) -> list[bool]:
        return [c.check(response) for c in self.constraints]

    def to_record(self) -> dict:
        return {"id": self.id, "source": self.source, "prompt": self.prompt,
                "constraints": [c.to_record() for c in self.constraints]}


# -------------------------------------------------------------------------------- demonstrations

# how a demonstrator opens an answer that must start with a given word
_OPENERS = {"Sure": "Sure!", "Yes": "Yes!", "Well": "Well then.", "Certainly": "Certainly!", "Here": "Here is my answer."}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(A-Z0-9])")
_MARKUP = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|#+)\s*")


def _sentences(text: str) -> list[str]:
    """The reference's sentences, list items and headings as sentences, markup and blank ones gone."""
    out = []
    for line in text.replace("**", "").replace("`", "").splitlines():
        line = _MARKUP.sub("", line).strip()
        out += [s.strip() for s in _SENTENCE_END.split(line) if words(s)]
    return [s if s[-1] in ".!?" else s.rstrip(":;,-") + "." for s in out]


def demonstration(task: Task, max_words: int = 40, min_words: int = 12) -> str | None:
    """A simulated labeler's demonstration for ``task`` (InstructGPT step 1: labelers write the
    answer they want; seeds 001/002): the task's reference answer, cut to whole sentences and
    edited as a person meeting the constraints would edit it, or None when no such answer of
    ``min_words``..``max_words`` words meets every constraint.

    The edits: sentences with a word to avoid are left out, commas dropped, the sentences kept
    fit the word limit (with the opener and the ending phrase), a sentence with the word to use
    is kept first when the opening ones lack it, N bullet points are the first N sentences, a
    first word opens the answer (:data:`_OPENERS`) and an ending phrase closes it. Only the
    train split's references are used for it (the judge's relevance term reads the reference of
    the prompt it scores)."""
    kinds = {c.kind: c.arg for c in task.constraints}
    limit = min([max_words] + [int(c.arg) for c in task.constraints if c.kind == "max_words"])
    start = kinds.get("start_with")
    opener = _OPENERS.get(start, f"{start}.") if start else ""
    ending = kinds.get("end_with", "")
    budget = limit - len(words(opener)) - len(words(ending))
    sents = [s for s in _sentences(task.reference)
             if not any(_has_word(s, c.arg) for c in task.constraints if c.kind == "avoid_word")]
    if "no_commas" in kinds:
        sents = [s.replace(",", "") for s in sents]
    if "include_word" in kinds:  # the sentence that uses the word first, then the rest in order
        first = next((s for s in sents if _has_word(s, kinds["include_word"])), None)
        if first is None:
            return None
        sents = [first] + [s for s in sents if s is not first]
    n = int(kinds["bullets"]) if "bullets" in kinds else None
    kept, used = [], 0
    for s in sents:
        size = len(words(s))
        if used + size > budget or (n is not None and len(kept) == n):
            break
        kept.append(s)
        used += size
    if n is not None and len(kept) < n:
        return None
    body = "\n".join(f"- {s}" for s in kept) if n is not None else " ".join(kept)
    head = " ".join(p for p in (opener, body) if p)
    text = ("\n" if n is not None else " ").join(p for p in (head, ending) if p)  # bullets: the ending on its own line
    if len(words(text)) < min_words or not all(task.met(text)):
        return None
    return text


def constraint_metadata(tasks: Sequence[Task], responses: Sequence[str], kinds: Sequence[str] = KINDS,
                        error: float = 0.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A simulated labeler's metadata for each (task, response): for every constraint of the task,
    whether the response follows it, as InstructGPT's labelers mark "follows explicit constraints
    in the instruction" beside their rankings (Ouyang et al. 2022, table 3), one answer per
    constraint. Each answer is wrong with probability ``error`` (seeded): a person misses one now
    and then.

    Returns (labels, asked), each (N, len(kinds)): labels 1.0 where the response follows the
    constraint of that kind, asked True where the task has one."""
    if len(tasks) != len(responses):
        raise DataError(f"{len(tasks)} tasks and {len(responses)} responses: one response per task")
    if not 0.0 <= error < 0.5:
        raise DataError(f"a labeler's error rate must be in [0, 0.5), got {error}")
    index = {k: i for i, k in enumerate(kinds)}
    labels, asked = np.zeros((len(tasks), len(kinds))), np.zeros((len(tasks), len(kinds)), dtype=bool)
    for n, (t, r) in enumerate(zip(tasks, responses)):
        for c, ok in zip(t.constraints, t.met(r)):
            if c.kind not in index:
                raise DataError(f"constraint kind {c.kind!r} is not among the metadata kinds {list(kinds)}")
            labels[n, index[c.kind]], asked[n, index[c.kind]] = float(ok), True
    flip = np.random.default_rng(seed).random(labels.shape) < error
    labels = np.where(flip & asked, 1.0 - labels, labels)
    return labels, asked


def load_instructions(data_dir: Path | None = None, max_words: int = 40) -> list[Task]:
    """Instructions of at most ``max_words`` words with a reference answer, without constraints:
    AlpacaEval (instruction, its example output), the self-instruct seed tasks (instruction and
    input, the instance output), MT-Bench first turns that have a GPT-4 reference."""
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    out: list[Task] = []
    try:
        alpaca = json.loads((data_dir / "alpaca-eval" / "outputs.json").read_text())
        seeds = [json.loads(line) for line in (data_dir / "self-instruct" / "seed_tasks.jsonl").read_text().splitlines() if line.strip()]
        mt = [json.loads(line) for line in (data_dir / "mt-bench" / "question.jsonl").read_text().splitlines() if line.strip()]
        mt_ref = {r["question_id"]: r["choices"][0]["turns"][0] for r in
                  (json.loads(line) for line in (data_dir / "mt-bench" / "reference_answer_gpt-4.jsonl").read_text().splitlines() if line.strip())}
    except (OSError, json.JSONDecodeError, KeyError, IndexError) as e:
        raise DataError(f"{data_dir}: cannot read the instruction data sets: {e}") from e
    for i, r in enumerate(alpaca):
        out.append(Task(f"alpaca-{i}", "alpaca-eval", r["instruction"], r["output"]))
    for r in seeds:
        inst = r["instances"][0]
        text = r["instruction"] + (("\n\n" + inst["input"]) if inst["input"].strip() else "")
        out.append(Task(r["id"], "self-instruct", text, inst["output"]))
    for r in mt:
        if r["question_id"] in mt_ref:
            out.append(Task(f"mt-bench-{r['question_id']}", "mt-bench", r["turns"][0], mt_ref[r["question_id"]]))
    seen, kept = set(), []
    for t in out:
        key = " ".join(t.instruction.split()).lower()
        if len(t.instruction.split()) <= max_words and t.reference.strip() and key not in seen:
            seen.add(key)
            kept.append(t)
    return kept


def _content_words(text: str) -> list[str]:
    return [w for w in tokenize(text) if w.isalpha() and len(w) >= 4 and w not in STOPWORDS]


def attach_constraints(tasks: Sequence[Task], seed: int = 0, per_prompt: int = 2,
                       kinds: Sequence[str] = DEFAULT_KINDS) -> list[Task]:
    """Each task with ``per_prompt`` constraints of different, compatible kinds (seeded).

    The words are chosen so that the request makes sense: "use the word X" takes a content
    word of the reference answer that the instruction does not contain (a good answer may well
    use it); "do not use the word X" takes a content word of the instruction that the reference
    also uses (the obvious word to avoid)."""
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise DataError(f"unknown constraint kinds {unknown}; known: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    out = []
    for t in tasks:
        inst_words = set(_content_words(t.instruction))
        ref_counts = Counter(_content_words(t.reference))
        include = sorted(w for w in ref_counts if w not in inst_words)
        avoid = sorted(w for w in inst_words if w in ref_counts)
        options = {
            "max_words": lambda: str(int(rng.choice([25, 35, 50]))),
            "include_word": (lambda: str(rng.choice(include))) if include else None,
            "avoid_word": (lambda: str(rng.choice(avoid))) if avoid else None,
            "bullets": lambda: str(int(rng.choice([2, 3, 4]))),
            "end_with": lambda: str(rng.choice(END_PHRASES)),
            "start_with": lambda: str(rng.choice(START_WORDS)),
            "no_commas": lambda: "",
            "lowercase": lambda: "",
        }
        chosen: list[Constraint] = []
        for k in rng.permutation(list(kinds)):
            if len(chosen) == per_prompt:
                break
            if options[k] is None or any(frozenset((k, c.kind)) in _CLASH for c in chosen):
                continue
            chosen.append(Constraint(str(k), options[k]()))
        out.append(Task(t.id, t.source, t.instruction, t.reference, tuple(chosen)))
    return out


def split_of(task_id: str, validation: float, test: float) -> str:
    """"train", "validation" or "test", from a hash of the task id: fixed whatever else changes."""
    u = int(hashlib.sha256(task_id.encode()).hexdigest()[:8], 16) / 16**8
    return "test" if u < test else "validation" if u < test + validation else "train"


def split_tasks(tasks: Sequence[Task], validation: float = 0.15, test: float = 0.2) -> dict[str, list[Task]]:
    out: dict[str, list[Task]] = {"train": [], "validation": [], "test": []}
    for t in tasks:
        out[split_of(t.id, validation, test)].append(t)
    return out


# -------------------------------------------------------------------------------- gold judge


def _fluency_corpus(data_dir: Path, exclude: set[str]) -> list[str]:
    """English text for the judge's trigram LM: reference answers, the QA-feedback gold answers and
    passages, flan-cot rationales, IMDB reviews; minus the texts in ``exclude`` (calibration)."""
    texts = [r["output"] for r in json.loads((data_dir / "alpaca-eval" / "outputs.json").read_text())]
    for line in (data_dir / "self-instruct" / "seed_tasks.jsonl").read_text().splitlines():
        if line.strip():
            texts += [i["output"] for i in json.loads(line)["instances"]]
    for line in (data_dir / "mt-bench" / "reference_answer_gpt-4.jsonl").read_text().splitlines():
        if line.strip():
            texts += json.loads(line)["choices"][0]["turns"]
    qa = data_dir / "finegrained-rlhf-qa-feedback" / "dev_feedback.json"
    if qa.is_file():
        for r in json.loads(qa.read_text()):
            texts.append(r.get("gold", ""))
            texts += [" ".join(p[1:]) for p in r.get("passages", []) if isinstance(p, list)]
    for name in ("aqua_train.tsv", "qasc_train.tsv", "strategyqa_train.tsv"):
        p = data_dir / "flan-cot" / name
        if p.is_file():
            texts += [line.split("\t")[-1] for line in p.read_text(encoding="utf-8", errors="replace").splitlines()]
    imdb = data_dir / "imdb-sample" / "texts.csv"
    if imdb.is_file():
        from rlhf.judge import load_imdb

        texts += [r.text for r in load_imdb(data_dir)]
    return [t for t in texts if t.strip() and t not in exclude]


def _tfidf(counts: Counter, idf: dict[str, float], default_idf: float) -> dict[str, float]:
    v = {w: c * idf.get(w, default_idf) for w, c in counts.items()}
    n = math.sqrt(sum(x * x for x in v.values()))
    return {w: x / n for w, x in v.items()} if n else {}


def _cos(a: dict[str, float], b: dict[str, float]) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(x * b.get(w, 0.0) for w, x in a.items())


@dataclass
class ConstraintJudge:
    """gold = met * relevance * fluency * (1 - repetition)^2 * substance * (1 - echo); see the module
    docstring. ``tasks`` maps each prompt (:attr:`Task.prompt`) to its task."""

    lm: NGramLM
    idf: dict[str, float]
    lp_good: float
    lp_bad: float
    rel_good: float
    rel_bad: float
    tasks: dict[str, Task] = field(default_factory=dict)
    min_words: int = 12
    _by_words: dict[str, Task] = field(default_factory=dict, repr=False)

    @classmethod
    def from_data(cls, data_dir: Path | None = None, tasks: Sequence[Task] = (), seed: int = 0) -> "ConstraintJudge":
        data_dir = Path(data_dir) if data_dir else default_data_dir()
        alpaca = json.loads((data_dir / "alpaca-eval" / "outputs.json").read_text())
        by_inst = {" ".join(r["instruction"].split()): r for r in alpaca}
        # pairs of independent answers to one instruction: self-instruct's own output for the
        # AlpacaEval instructions that came from it (AlpacaEval joins instruction and input)
        pairs = []
        for line in (data_dir / "self-instruct" / "user_oriented_instructions.jsonl").read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            inst = r["instances"][0]
            for key in (" ".join((r["instruction"] + "\n\n" + inst["input"]).split()), " ".join(r["instruction"].split())):
                if key in by_inst and inst["output"].strip():
                    pairs.append((by_inst[key]["instruction"], by_inst[key]["output"], inst["output"]))
                    break
        if len(pairs) < 20:
            raise DataError(f"{data_dir}: too few instructions with two answers ({len(pairs)}) to calibrate relevance")
        held = {p[2] for p in pairs}
        lm = NGramLM(tokenize(t) for t in _fluency_corpus(data_dir, held))
        docs = [Counter(_content_words(r["instruction"] + " " + r["output"])) for r in alpaca]
        df = Counter(w for d in docs for w in d)
        idf = {w: math.log((1 + len(docs)) / (1 + c)) + 1.0 for w, c in df.items()}
        judge = cls(lm, idf, 0.0, 0.0, 0.0, 0.0, {t.prompt: t for t in tasks})
        judge._calibrate(pairs, seed)
        return judge

    def _topic(self, instruction: str, reference: str) -> dict[str, float]:
        return _tfidf(Counter(_content_words(instruction + " " + reference)), self.idf, self._default_idf())

    def _default_idf(self) -> float:
        return max(self.idf.values()) if self.idf else 1.0

    def _cosine(self, instruction: str, reference: str, response: str, exclude: frozenset[str] = frozenset()) -> float:
        r = _tfidf(Counter(w for w in _content_words(response) if w not in exclude), self.idf, self._default_idf())
        return _cos(r, self._topic(instruction, reference))

    def _slor(self, response: str) -> float:
        return self.lm.slor_tokens([], tokenize(response))

    def _calibrate(self, pairs: list[tuple[str, str, str]], seed: int) -> None:
        """Anchors: real answers vs shuffled words (fluency), an independent answer to the same
        instruction vs an answer to another instruction (relevance); medians."""
        rng = np.random.default_rng(seed)
        good, bad = [], []
        for _, _, answer in pairs:
            toks = tokenize(answer)
            if toks:
                good.append(self.lm.slor_tokens([], toks))
                bad.append(self.lm.slor_tokens([], [toks[i] for i in rng.permutation(len(toks))]))
        self.lp_good, self.lp_bad = float(np.median(good)), float(np.median(bad))
        same = [self._cosine(inst, ref, ans) for inst, ref, ans in pairs]
        other = [self._cosine(pairs[j][0], pairs[j][1], pairs[i][2])
                 for i, j in enumerate(rng.permutation(len(pairs))) if i != j]
        self.rel_good, self.rel_bad = float(np.median(same)), float(np.median(other))
        if not (self.lp_good > self.lp_bad and self.rel_good > self.rel_bad):
            raise DataError("judge calibration failed: real answers do not beat shuffled or off-topic ones")

    def add_tasks(self, tasks: Sequence[Task]) -> None:
        self.tasks.update({t.prompt: t for t in tasks})

    def task(self, prompt: str) -> Task:
        """The task of ``prompt``; prompts that differ only in white space are the same (a service
        on the way may strip a template's trailing newline)."""
        t = self.tasks.get(prompt)
        if t is None:
            if len(self._by_words) != len(self.tasks):
                self._by_words = {" ".join(k.split()): v for k, v in self.tasks.items()}
            t = self._by_words.get(" ".join(prompt.split()))
        if t is None:
            raise DataError("the judge knows no task with this prompt (add_tasks first)")
        return t

    def components(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, np.ndarray]:
        """Every factor, ``met``, ``relevance_fluency`` (the product without ``met``) and ``gold``."""
        if len(prompts) != len(responses):
            raise ValueError(f"got {len(prompts)} prompts for {len(responses)} responses")
        n = len(responses)
        f = {k: np.zeros(n) for k in ("met", "relevance", "fluency", "repetition", "substance", "echo")}
        all_met = np.zeros(n)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            t = self.task(p)
            met = t.met(r)
            f["met"][i] = float(np.mean(met)) if met else 1.0
            all_met[i] = float(all(met))
            toks = tokenize(r)
            ws = words(r)
            limit = [int(c.arg) for c in t.constraints if c.kind == "max_words"]
            need = min([self.min_words] + [max(1, x // 2) for x in limit])
            f["substance"][i] = min(1.0, len(ws) / need)
            if not any(w.isalpha() for w in toks):
                f["repetition"][i] = 1.0
                continue
            lp = self._slor(r)
            f["fluency"][i] = float(np.clip((lp - self.lp_bad) / (self.lp_good - self.lp_bad), 0.0, 1.0))
            # the words a constraint dictates say nothing about the topic: "use the word ribbon" is
            # met by any filler that says "ribbon"
            dictated = frozenset(w for c in t.constraints if c.kind in ("include_word", "end_with", "start_with")
                                 for w in _content_words(c.arg))
            c = self._cosine(t.instruction, t.reference, r, dictated)
            f["relevance"][i] = float(np.clip((c - self.rel_bad) / (self.rel_good - self.rel_bad), 0.0, 1.0))
            f["repetition"][i] = repeated_ngram_share(toks, 3)
            rw = [w.lower() for w in ws]
            grams = list(zip(rw, rw[1:], rw[2:], rw[3:]))
            if grams:
                pw = [w.lower() for w in words(p)]
                prompt_grams = set(zip(pw, pw[1:], pw[2:], pw[3:]))
                f["echo"][i] = sum(g in prompt_grams for g in grams) / len(grams)
        rf = f["relevance"] * f["fluency"] * (1 - f["repetition"]) ** 2 * f["substance"] * (1 - f["echo"])
        return {**f, "all_met": all_met, "relevance_fluency": rf, "gold": f["met"] * rf}

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Gold score in [0, 1] for each (prompt, response)."""
        return self.components(prompts, responses)["gold"]
