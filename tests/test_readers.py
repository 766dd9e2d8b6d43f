"""The data-file readers on bad input: task files (finetune/predict), eval files (choice, generate,
LAMBADA) and RL files (demonstrations, preferences, prompts).

Each reader either returns records that are what its callers assume (checked here independently of the
reader's own validation) or raises NpgptError, never another exception. The property tests run on
generated files (JSON lines with random values in every field, CSV/TSV tables, raw bytes): each has a
quick, derandomized version in the normal suite and a long one marked fuzz (`make fuzz`; see
fuzzing.py for NPGPT_FUZZ_EXAMPLES and NPGPT_FUZZ_SECONDS).
"""
import atexit
import csv
import io
import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from npgpt.chat import ROLES, read_demos, read_preferences, read_prompts
from npgpt.errors import NpgptError
from npgpt.evaluate import (_split_template, decode_escapes, read_choice_items, read_generate_items,
                            read_lambada_items)
from npgpt.finetune import TASKS, read_task_file

from fuzzing import campaign, fuzz_settings, quick_settings


def property_test(**strategies):
    """Two tests of one property `fn(**drawn)`: (quick, fuzz)."""
    def wrap(fn):
        @pytest.mark.fuzz
        def fuzz():
            campaign(fuzz_settings()(given(**strategies)(fn)))
        return quick_settings(40)(given(**strategies)(fn)), fuzz
    return wrap


_work = []


def work() -> Path:
    """One scratch dir for the generated files (each example overwrites the last one's)."""
    if not _work:
        _work.append(Path(tempfile.mkdtemp(prefix="npgpt-readers-")))
        atexit.register(shutil.rmtree, _work[0], True)
    return _work[0]


# ---------------------------------------------------------------- generated records
ODD = ["", " ", "\ud800", "a\udfffb", "é", "<|end|>", "\n", "0", "1", "choice0", "\n\nHuman: hi",
       "\n\nAssistant: yo"]
text = st.text(max_size=6) | st.sampled_from(ODD)
scalar = st.none() | st.booleans() | st.integers(-2, 4) | st.integers() | st.floats() | text
value = st.recursive(scalar, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=3), max_leaves=8)
message = st.fixed_dictionaries({}, optional={"role": st.sampled_from(list(ROLES) + ["bot"]) | value,
                                              "content": text | value})
messages = st.lists(message, max_size=3) | value
strings = st.lists(text, max_size=4) | value
dialogue = st.lists(st.tuples(st.sampled_from(["Human", "Assistant"]), text), max_size=3).map(
    lambda turns: "".join(f"\n\n{r}: {t}" for r, t in turns))
choice_item = st.fixed_dictionaries({"context": text, "choices": st.lists(text, min_size=2, max_size=3),
                                     "label": st.integers(0, 2)})
FIELDS = {
    "text": text | value, "premise": text, "hypothesis": text, "a": text, "b": text, "context": text | value,
    "question": text | value, "instruction": text | value, "input": text | value, "output": text | value,
    "prompt": text | messages, "response": text | value, "completion": text, "answer": text,
    "chosen": text | dialogue | value, "rejected": text | dialogue, "choices": strings, "answers": strings,
    "responses": strings, "label": st.integers(-1, 3) | st.booleans() | text | value,
    "ranking": st.lists(st.integers(-1, 3) | st.booleans() | st.floats(0, 2) | text, max_size=4) | value,
    "messages": messages, "demos": st.lists(choice_item | value, max_size=2) | value,
}


def records(*fields):
    """JSON objects with any of `fields` (plausible or random values) and, rarely, random keys."""
    return st.fixed_dictionaries({}, optional={k: FIELDS[k] for k in fields}) | st.dictionaries(text, value,
                                                                                               max_size=3)


def jsonl(recs):
    """File bytes: JSON lines of `recs`, blank lines, broken lines and random bytes."""
    line = recs.map(lambda r: json.dumps(r).encode()) | st.sampled_from(
        [b"", b"  ", b"[1]", b"{", b'"x"', b"\xff\xfe", b"{}", b"[" * 5000]) | st.binary(max_size=8)
    return st.lists(line, max_size=5).map(b"\n".join)


def n_records(data: bytes) -> int:
    """Lines of a JSON-lines file that hold something (a reader that succeeds must account for each)."""
    return sum(1 for ln in data.split(b"\n") if ln.decode("utf-8", "replace").strip())


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_text(x):
    """A str the tokenizers can take: no lone surrogates."""
    if not isinstance(x, str):
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_or_error(read, *args, **kw):
    """read(...) or None when it raised NpgptError (any other exception fails the test)."""
    try:
        return read(*args, **kw)
    except NpgptError as e:
        assert "\n" not in str(e).strip(), str(e)  # one line
        return None


def write(name, data: bytes):
    path = work() / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- what callers assume
def valid_task_example(r, task, labelled):
    for k in TASKS[task]:
        if k == "choices":
            ch = r[k]
            assert isinstance(ch, list) and len(ch) >= 2 and all(is_text(c) and c for c in ch)
        else:
            assert is_text(r[k]) and r[k]
    if labelled:
        assert "label" in r
    if "label" in r:
        if task == "choice":
            assert is_int(r["label"]) and 0 <= r["label"] < len(r["choices"])
        else:
            assert is_int(r["label"]) or (is_text(r["label"]) and r["label"])
    assert is_int(r["_line"])


def valid_choice_item(it):
    """An eval item: the context may be empty (the template can hold the prompt), choices may not."""
    assert is_text(it["context"])
    ch = it["choices"]
    assert isinstance(ch, list) and len(ch) >= 2 and all(is_text(c) and c for c in ch)
    assert is_int(it["label"]) and 0 <= it["label"] < len(ch)


def valid_messages(msgs):
    assert isinstance(msgs, list) and msgs
    for m in msgs:
        assert set(m) == {"role", "content"} and m["role"] in ROLES and is_text(m["content"])


# ---------------------------------------------------------------- task files
@st.composite
def task_file(draw):
    task = draw(st.sampled_from(sorted(TASKS)))
    good = st.fixed_dictionaries({k: st.text(min_size=1, max_size=4) for k in TASKS[task] if k != "choices"}
                                 | ({"choices": st.lists(st.text(min_size=1, max_size=3), min_size=2, max_size=2),
                                     "label": st.integers(0, 1)} if task == "choice" else
                                    {"label": st.sampled_from(["x", "y", 0, 1])}))
    data = draw(jsonl(good | good | records(*TASKS[task], "label")))
    return task, data


def check_task_jsonl(case, labelled):
    task, data = case
    out = read_or_error(read_task_file, write("t.jsonl", data), task, labelled=labelled)
    if out is not None:
        assert len(out) == n_records(data)
        for r in out:
            valid_task_example(r, task, labelled)
        if task == "choice":
            assert len({len(r["choices"]) for r in out}) == 1


test_task_jsonl, test_task_jsonl_fuzz = property_test(case=task_file(), labelled=st.booleans())(check_task_jsonl)

CELL = st.text(max_size=4) | st.sampled_from(["", " ", "0", "1", "2", "10", "-1", "a,b", 'x"y', "a\nb", "\t", "1_0"])
COLUMNS = ["text", "premise", "hypothesis", "a", "b", "context", "label", "choice0", "choice1", "choice2",
           "choice10", "choice01", "choices", "", "x"]


@st.composite
def table(draw):
    """(task, suffix, bytes) of a CSV/TSV table: a header of plausible columns, rows of random cells
    (sometimes too many or too few), written by csv.writer; or random text."""
    task = draw(st.sampled_from(sorted(TASKS)))
    suffix = draw(st.sampled_from([".csv", ".tsv"]))
    if draw(st.integers(0, 9)) == 0:
        return task, suffix, draw(st.binary(max_size=40) | st.text(alphabet=',\t"\n\rabc01', max_size=40).map(str.encode))
    header = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=6))
    rows = draw(st.lists(st.lists(CELL, min_size=max(0, len(header) - 1), max_size=len(header) + 1), max_size=4))
    buf = io.StringIO()
    w = csv.writer(buf, delimiter="\t" if suffix == ".tsv" else ",")
    w.writerow(header)
    w.writerows(rows)
    return task, suffix, buf.getvalue().encode()


def check_task_table(case, labelled):
    task, suffix, data = case
    out = read_or_error(read_task_file, write("t" + suffix, data), task, labelled=labelled)
    for r in out or []:
        valid_task_example(r, task, labelled)


test_task_table, test_task_table_fuzz = property_test(case=table(), labelled=st.booleans())(check_task_table)


# ---------------------------------------------------------------- eval files
def check_choice_file(data):
    out = read_or_error(read_choice_items, write("c.jsonl", data))
    if out is not None:
        assert len(out) == n_records(data)
        for it in out:
            valid_choice_item(it)
            for d in it.get("demos", []):
                valid_choice_item(d)


test_choice_file, test_choice_file_fuzz = property_test(
    data=jsonl(choice_item | records("context", "choices", "label", "demos")))(check_choice_file)


def check_generate_file(data):
    out = read_or_error(read_generate_items, write("g.jsonl", data))
    if out is not None:
        assert len(out) == n_records(data)
        for it in out:
            assert is_text(it["context"] if "context" in it else it["question"])
            assert isinstance(it["answers"], list) and it["answers"] and all(is_text(a) for a in it["answers"])


test_generate_file, test_generate_file_fuzz = property_test(
    data=jsonl(records("context", "question", "answers")))(check_generate_file)


def check_lambada_file(data):
    out = read_or_error(read_lambada_items, write("l.jsonl", data))
    for it in out or []:
        assert is_text(it["text"]) and " " in it["text"].strip()


test_lambada_file, test_lambada_file_fuzz = property_test(data=jsonl(records("text")))(check_lambada_file)


# ---------------------------------------------------------------- RL files
def check_demos(data, skip_bad):
    out = read_or_error(read_demos, write("d.jsonl", data), skip_bad=skip_bad)
    if out is not None:
        convs, skipped = out
        assert len(convs) + skipped == n_records(data) and (skip_bad or skipped == 0)
        for msgs in convs:
            valid_messages(msgs)
            assert any(m["role"] == "assistant" and m["content"].strip() for m in msgs)


test_demos, test_demos_fuzz = property_test(
    data=jsonl(records("messages", "prompt", "response", "completion", "answer", "instruction", "input", "output")),
    skip_bad=st.booleans())(check_demos)


def check_preferences(data, skip_bad):
    out = read_or_error(read_preferences, write("p.jsonl", data), skip_bad=skip_bad)
    if out is not None:
        recs, skipped = out
        assert len(recs) + skipped == n_records(data) and (skip_bad or skipped == 0)
        for r in recs:
            valid_messages(r["prompt"])
            resp = r["responses"]
            assert len(resp) >= 2 and all(is_text(x) and x and x == x.strip() for x in resp)
            assert len(set(resp)) == len(resp)
            assert all(is_int(i) for i in r["ranking"]) and sorted(r["ranking"]) == list(range(len(resp)))


test_preferences, test_preferences_fuzz = property_test(
    data=jsonl(records("prompt", "chosen", "rejected", "responses", "ranking")),
    skip_bad=st.booleans())(check_preferences)


def check_prompts(data, suffix):
    out = read_or_error(read_prompts, write("q" + suffix, data))
    if out is not None:
        assert out and (suffix != ".jsonl" or len(out) == n_records(data))
        for msgs in out:
            valid_messages(msgs)
            if len(msgs) == 1 and msgs[0]["role"] == "user":
                assert msgs[0]["content"]


test_prompts, test_prompts_fuzz = property_test(
    data=jsonl(records("prompt", "messages")) | st.binary(max_size=30),
    suffix=st.sampled_from([".jsonl", ".txt"]))(check_prompts)


# ---------------------------------------------------------------- command-line strings
def check_separator(s):
    out = read_or_error(decode_escapes, s)
    if out is not None:
        assert is_text(out)
        if "\\" not in s:
            assert out == s  # nothing but escapes is changed: non-ASCII text stays as it is


test_separator, test_separator_fuzz = property_test(
    s=st.text(alphabet=st.sampled_from(list("\\xuUntr0a9fé—\ud800{}")), max_size=12) | st.text(max_size=8))(
    check_separator)


def check_template(t):
    out = read_or_error(_split_template, t)
    if out is not None:
        before, after = out  # the two halves around {choice} mean what the template meant
        assert before.format(context="C") + "X" + after.format(context="C") == t.format(context="C", choice="X")


test_template, test_template_fuzz = property_test(
    t=st.lists(st.sampled_from(["{context}", "{choice}", "{", "}", "{{", "}}", "{x}", "{}", "a", ":", "{context:>2}",
                                "{choice!r}", "{context.x}", "{0}"]), max_size=6).map("".join))(check_template)


# ---------------------------------------------------------------- the reported cases, one by one
def jsonl_file(name, *recs):
    return write(name, "".join(json.dumps(r) + "\n" for r in recs).encode())


@pytest.mark.parametrize("rec,match", [
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [True, False]}, "'ranking' must list"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": ["a", 0]}, "'ranking' must list"),
    ({"prompt": "p", "responses": ["a", "b"], "ranking": [1.0, 0.0]}, "'ranking' must list"),
    ({"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"}, "'prompt' must be a non-empty list"),
])
def test_bad_preference_records(rec, match):
    with pytest.raises(NpgptError, match=":1: " + match):
        read_preferences(jsonl_file("p.jsonl", rec))


def test_bad_demo_and_prompt_files():
    with pytest.raises(NpgptError, match=":1: field 'input' must be a string"):
        read_demos(jsonl_file("d.jsonl", {"instruction": "do", "input": {"x": 1}, "output": "ok"}))
    with pytest.raises(NpgptError, match=":2: a string holds a lone surrogate"):
        read_demos(write("d.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "\\udc80", "response": "b"}\n'))
    with pytest.raises(NpgptError, match=":2: not valid UTF-8"):
        read_prompts(write("q.txt", b"hello\nbad \xff byte\n"))
    with pytest.raises(NpgptError, match=":1: JSON nested too deeply"):
        read_prompts(write("q.jsonl", b"[" * 100_000))
    with pytest.raises(NpgptError, match=":1: empty prompt"):
        read_prompts(jsonl_file("q.jsonl", {"prompt": "  "}))
    with pytest.raises(NpgptError, match=":1: 'messages' must be a non-empty list"):
        read_prompts(jsonl_file("q.jsonl", {"messages": []}))


def test_a_prompt_of_empty_messages_is_refused(tmp_path):
    """Found by `make fuzz`: {"messages": [{"role": "user", "content": ""}]} was accepted as a prompt."""
    for rec in ({"messages": [{"role": "user", "content": ""}]},
                {"prompt": [{"role": "system", "content": " "}, {"role": "user", "content": "\n"}]}):
        with pytest.raises(NpgptError, match="every message in .* is empty"):
            read_prompts(jsonl_file("q.jsonl", rec))
    with pytest.raises(NpgptError, match="every message in 'prompt' is empty"):
        read_preferences(jsonl_file("p.jsonl", {"prompt": [{"role": "user", "content": ""}], "chosen": "a",
                                                "rejected": "b"}))
