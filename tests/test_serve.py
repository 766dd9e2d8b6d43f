"""`npgpt serve`: the continuous-batching engine against `generate`, every route through the `openai`
client, streaming, errors, the API key, the queue limit, disconnects, the CLI, and the chat page in a
real browser."""
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import uvicorn

from npgpt.chat import add_chat_tokens, chat_prompt
from npgpt.checkpoint import save_checkpoint
from npgpt.config import GPTConfig
from npgpt.model import GPT
from npgpt.sampling import cut_at_stop, generate
from npgpt.serve import Engine, Sequence, Server, Settings, listen
from npgpt.tokenizer import Tokenizer

from conftest import run_cli

ALPHABET = "abcdefghijklmnopqrstuvwxyz ?.!,"


def make_model(ln="pre", seed=0):
    """A tiny chat model (context 24, so generations shift their window) with sharp distributions."""
    tok = Tokenizer.train_char([ALPHABET])
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=tok.vocab_size, ln=ln)
    m = add_chat_tokens(GPT(cfg, seed=seed, tokenizer=tok))
    m.flat *= 8
    return m


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    d = tmp_path_factory.mktemp("serve") / "tiny"
    save_checkpoint(d, model)
    return d


def greedy(model, ids, n, eos=None, stop=None, **kw):
    """What `npgpt generate --temperature 0` makes of ids: the text of its continuation."""
    out = [int(t) for t in generate(model, ids, n, temperature=kw.pop("temperature", 0), eos_id=eos, stop=stop,
                                    **kw)[0][len(ids):]]
    return cut_at_stop(model.tokenizer.decode(out[:-1] if out and out[-1] == eos else out), stop)


@contextlib.contextmanager
def serving(model, **kw):
    """A server for `model` in this process on a free port; yields its base URL once /health is 200."""
    state = Server(model if callable(model) else lambda: model, "tiny", **kw)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(state.app(), log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(10)


def wait_ready(url, timeout=30):
    end = time.time() + timeout
    while time.time() < end:
        with contextlib.suppress(OSError):
            if request(url, "GET", "/health")[0] == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(url)


def request(url, method, path, body=None, headers=None):
    """(status, parsed JSON or text) of one plain HTTP request."""
    c = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    c.request(method, path, None if body is None else (body if isinstance(body, str) else json.dumps(body)),
              {"Content-Type": "application/json", **(headers or {})})
    r = c.getresponse()
    text = r.read().decode()
    c.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def metric(url, name) -> float:
    text = request(url, "GET", "/metrics")[1]
    return float(re.search(rf"^npgpt_{name} (\S+)$", text, re.M).group(1))


@pytest.fixture(scope="module")
def url(model):
    with serving(model, parallel=3, max_queue=16) as u:
        wait_ready(u)
        yield u


# ---------------------------------------------------------------- the engine
def run_engine(engine, model, prompts, settings, seeds=None, stagger=()):
    """Generate every prompt through the engine; prompts whose index is in `stagger` are submitted
    only once the first has made 5 tokens (a longer prompt then joins a batch that is already going).
    Returns the texts."""
    texts = [[] for _ in prompts]
    done = [threading.Event() for _ in prompts]
    started = threading.Event()

    def on(i):
        def f(e):
            assert "error" not in e, e
            texts[i].append(e["text"])
            if i == 0 and len(texts[0]) == 5:
                started.set()
            if e["finish_reason"]:
                done[i].set()
        return f
    seqs = [Sequence(model, p, settings, None if seeds is None else seeds[i], on(i)) for i, p in enumerate(prompts)]
    engine.submit([s for i, s in enumerate(seqs) if i not in stagger])
    if stagger:
        assert started.wait(10)
        engine.submit([seqs[i] for i in stagger])
    for d in done:
        assert d.wait(30)
    return ["".join(t) for t in texts]


@pytest.mark.parametrize("ln", ["pre", "post"])  # fused decode kernels; the layer-by-layer NumPy path
def test_engine_batches_equal_generate_one_by_one(ln):
    """Sequences of different lengths and ages in one ragged cache, joining while others run (a longer
    prompt moves the batch right), retiring at different times and shifting their windows past the
    context, each give the greedy text of `generate` alone."""
    m = make_model(ln)
    assert m.fused_decode == (ln == "pre")
    engine = Engine(m, parallel=3, max_queue=8)
    try:
        prompts = [m.tokenizer.encode(p) for p in ["ab", "the cat sat on a mat", "why?", "z", "hello there, friend"]]
        got = run_engine(engine, m, prompts, Settings(max_tokens=50, temperature=0), stagger=(1, 4))
        assert got == [greedy(m, p, 50) for p in prompts]
        assert not engine.rows and engine.end == 0
    finally:
        engine.close()


def test_engine_eos_stop_and_sampling_settings_follow_generate(model):
    engine = Engine(model, parallel=2)
    try:
        ids = model.tokenizer.encode("a cat")
        full = [int(t) for t in generate(model, ids, 30, temperature=0)[0][len(ids):]]
        eos = full[6]  # greedy makes this token: the reply ends at its first occurrence
        assert run_engine(engine, model, [ids], Settings(max_tokens=30, temperature=0, eos_id=eos)) == \
            [greedy(model, ids, 30, eos=eos)]
        stop = model.tokenizer.decode(full[8:10])
        assert run_engine(engine, model, [ids], Settings(max_tokens=30, temperature=0, stop=(stop,))) == \
            [greedy(model, ids, 30, stop=[stop])]
        kw = dict(temperature=1.3, top_k=5, top_p=0.9, repetition_penalty=1.5)
        got = run_engine(engine, model, [ids, ids], Settings(max_tokens=40, **kw), seeds=[7, 8])
        assert got == [greedy(model, ids, 40, seed=7, **kw), greedy(model, ids, 40, seed=8, **kw)]
        assert engine.counts["generated_tokens"] > 0
    finally:
        engine.close()


# ---------------------------------------------------------------- the routes, through the openai client
def test_completions_greedy_equal_generate_alone_and_concurrent(model, url):
    c = client(url)
    prompts = ["ab", "the cat sat", "why?", "z", "hello there", "a b c", "on a mat", "quick"]
    lengths = [5, 40, 12, 60, 3, 30, 25, 50]
    want = [greedy(model, model.tokenizer.encode(p), n) for p, n in zip(prompts, lengths)]
    r = c.completions.create(model="tiny", prompt=prompts[1], max_tokens=lengths[1], temperature=0)
    assert r.choices[0].text == want[1] and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompts[1]) and r.usage.completion_tokens == lengths[1]

    def one(i):
        return c.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], temperature=0).choices[0].text
    with ThreadPoolExecutor(8) as pool:  # 8 requests on 3 slots: queued, admitted and retired at every step
        assert list(pool.map(one, range(8))) == want
    # a batch of prompts, and token ids
    r = c.completions.create(model="tiny", prompt=prompts[:3], max_tokens=12, temperature=0)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == \
        [greedy(model, model.tokenizer.encode(p), 12) for p in prompts[:3]]
    ids = model.tokenizer.encode("why?")
    assert c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0).choices[0].text == want[2]


def test_streaming_completion_and_chat_with_usage(model, url):
    c = client(url)
    chunks = list(c.completions.create(model="tiny", prompt="the cat", max_tokens=30, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == greedy(model, model.tokenizer.encode("the cat"), 30)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    ids, end = chat_prompt(model, "hi there")
    want = greedy(model, ids, 30, eos=end, stop=["<|end|>"])
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": " hi there "}],
                                            max_tokens=30, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].usage is None  # not asked for
    # the raw events end with [DONE]
    c2 = http.client.HTTPConnection(url.split("//")[1], timeout=30)
    c2.request("POST", "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 3, "stream": True}),
               {"Content-Type": "application/json"})
    r = c2.getresponse()
    assert r.getheader("content-type").startswith("text/event-stream")
    assert r.read().decode().endswith("data: [DONE]\n\n")


def test_chat_equals_the_cli_and_needs_the_template(model, model_dir, url):
    c = client(url)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "about a dog"}], max_tokens=30,
                                  temperature=0)
    cli = run_cli("generate", "--chat", "about a dog", "--model", model_dir, "-t", "0", "-n", "30", "--threads", "1")
    assert cli.returncode == 0, cli.stderr
    assert r.choices[0].message.content == cli.stdout.rstrip("\n") and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(chat_prompt(model, "about a dog")[0])
    # a conversation, with a system turn and text parts
    msgs = [{"role": "system", "content": "brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "why?"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    from npgpt.chat import chat_ids, encode_chat
    ids = encode_chat(model, [{**m, "content": m["content"] if isinstance(m["content"], str) else "hi"} for m in msgs],
                      generation_prompt=True)[0]
    assert r.choices[0].message.content == greedy(model, ids, 10, eos=chat_ids(model)["<|end|>"], stop=["<|end|>"])
    plain = make_model()
    plain.tokenizer = Tokenizer.train_char([ALPHABET])  # no chat tokens
    with serving(plain) as u:
        wait_ready(u)
        with pytest.raises(openai.BadRequestError, match="no chat tokens"):
            client(u).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_seed_n_logprobs_and_extensions(model, url):
    c = client(url)
    ids = model.tokenizer.encode("a cat")
    kw = dict(temperature=0.9, top_p=0.95)
    r = c.completions.create(model="tiny", prompt="a cat", max_tokens=20, n=3, seed=11, **kw)
    assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == \
        [greedy(model, ids, 20, seed=11 + j, **kw) for j in range(3)]  # choice j draws as --seed 11+j
    r = c.completions.create(model="tiny", prompt="a cat", max_tokens=15, temperature=0, logprobs=3,
                             extra_body={"top_k": 4, "repetition_penalty": 1.3})
    assert r.choices[0].text == greedy(model, ids, 15, top_k=4, repetition_penalty=1.3)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.top_logprobs[0]) == 3
    z = model.forward(np.array([ids]))[0, -1].astype(np.float64)
    ref = z - z.max() - np.log(np.exp(z - z.max()).sum())
    assert lp.token_logprobs[0] == pytest.approx(ref[model.tokenizer.encode(lp.tokens[0])[0]], abs=1e-5)
    assert list(lp.top_logprobs[0].values()) == pytest.approx(np.sort(ref)[::-1][:3], abs=1e-5)
    r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                  temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy takes the top one


def test_models_health_metrics_and_errors(model, url):
    c = client(url)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert c.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-4")
    with pytest.raises(openai.NotFoundError, match="not found"):
        c.completions.create(model="gpt-4", prompt="a")
    assert request(url, "GET", "/health") == (200, {"status": "ok"})
    status, body = request(url, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    for bad, match in [({"temperature": -1}, "temperature"), ({"top_p": 2}, "top_p"), ({"n": 0}, "'n'"),
                       ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": "many"}, "integer"),
                       ({"stop": [""]}, "stop"), ({"seed": -1}, "seed"), ({"presence_penalty": 1}, "not supported"),
                       ({"prompt": "a" * 25}, "context"), ({"prompt": "ABC"}, "char"), ({"prompt": [99999]}, "token ids"),
                       ({"logprobs": 50}, "logprobs"), ({"stream": "yes"}, "stream"), ({"n": 10 ** 9}, "at most"),
                       ({"prompt": ["a"] * 100}, "at most")]:
        with pytest.raises(openai.BadRequestError, match=match):
            c.completions.create(model="tiny", **{"prompt": "a", **bad})
    for msgs in [[], [{"role": "robot", "content": "hi"}], [{"role": "user", "content": "  "}]]:
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=msgs)
    status, body = request(url, "POST", "/v1/completions", "{not json")
    assert status == 400 and "JSON" in body["error"]["message"]
    c.completions.create(model="tiny", prompt="a", max_tokens=3)
    text = request(url, "GET", "/metrics")[1]
    assert re.search(r'npgpt_requests_total\{route="/v1/completions",code="400"\} \d+', text)
    assert metric(url, "generated_tokens_total") > 0 and metric(url, "slots_total") == 3
    status, page = request(url, "GET", "/")
    assert status == 200 and "/v1/chat/completions" in page


def test_api_key(model):
    with serving(model, api_key="s3cret") as u:
        wait_ready(u)
        with pytest.raises(openai.AuthenticationError):
            client(u, "wrong").completions.create(model="tiny", prompt="a", max_tokens=2)
        assert request(u, "GET", "/metrics")[0] == 401
        assert client(u, "s3cret").completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text
        assert request(u, "GET", "/health")[0] == 200 and request(u, "GET", "/")[0] == 200


def test_health_is_503_while_loading(model):
    go = threading.Event()
    with serving(lambda: go.wait() and model) as u:
        time.sleep(0.2)
        assert request(u, "GET", "/health") == (503, {"status": "loading"})
        with pytest.raises(openai.InternalServerError):
            client(u).completions.create(model="tiny", prompt="a")
        go.set()
        wait_ready(u)
        assert client(u).completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text


def test_queue_full_and_a_client_that_leaves_frees_its_slot(model):
    with serving(model, parallel=1, max_queue=0) as u:
        wait_ready(u)
        conn = http.client.HTTPConnection(u.split("//")[1], timeout=30)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 10 ** 7, "stream": True}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.readline().startswith(b"data: ")  # generating (past the context, until it is stopped)
        assert metric(u, "slots_busy") == 1
        with pytest.raises(openai.RateLimitError):
            client(u).completions.create(model="tiny", prompt="a", max_tokens=2)
        conn.close()  # the client leaves
        end = time.time() + 5
        while metric(u, "slots_busy") and time.time() < end:
            time.sleep(0.01)
        assert metric(u, "slots_busy") == 0
        made = metric(u, "generated_tokens_total")
        time.sleep(0.2)
        assert metric(u, "generated_tokens_total") == made  # nothing generated for nobody
        # a non-streaming client that gives up is noticed too
        with pytest.raises(openai.APITimeoutError):
            client(u).with_options(timeout=0.5).completions.create(model="tiny", prompt="a", max_tokens=10 ** 7)
        end = time.time() + 5
        while metric(u, "slots_busy") and time.time() < end:
            time.sleep(0.01)
        assert metric(u, "slots_busy") == 0
        assert client(u).completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text


# ---------------------------------------------------------------- the command
def test_cli_serves_until_interrupted(model, model_dir, tmp_path):
    key = tmp_path / "key"
    key.write_text("k3y\n")
    p = subprocess.Popen([sys.executable, "-m", "npgpt_cli.main", "serve", "--model", str(model_dir), "--port", "0",
                          "--api-key-file", str(key), "--threads", "1", "--parallel", "2"],
                         stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in p.stderr:
            if "ready at" in line:
                url = re.search(r"(http://\S+)/", line).group(1)
                break
        assert url, "the server did not start"
        r = client(url, "k3y").completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0)
        assert r.choices[0].text == greedy(model, model.tokenizer.encode("the cat"), 20)
        p.send_signal(signal.SIGINT)  # Ctrl-C: a graceful stop, then the CLI's "interrupted" exit
        assert p.wait(20) == 130 and "interrupted" in p.stderr.read()
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("args, match", [
    (["--model", "/no/such/dir"], "not found"),
    (["--api-key", "a", "--api-key-file", "f"], "not both"),
    (["--host", "256.1.1.1"], "cannot listen"),
])
def test_cli_bad_input_is_one_line(args, match):
    r = run_cli("serve", *args, timeout=60)
    assert r.returncode == 1 and match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


# ---------------------------------------------------------------- the chat page, in a real browser
def test_chat_page_streams_a_reply_in_a_browser(model):
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        why = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        if os.environ.get("NPGPT_REQUIRE_REF"):  # .ci/run installs them: there a missing browser is a failure
            pytest.fail(why)
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    opts = webdriver.ChromeOptions()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    opts.binary_location = shutil.which("chromium")
    ids, end = chat_prompt(model, "about a dog")
    want = greedy(model, ids, 30, eos=end, stop=["<|end|>"])
    with serving(model) as u:
        wait_ready(u)
        driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(shutil.which("chromedriver")))
        try:
            driver.get(u + "/")
            WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "model").text == "tiny")
            for field, value in (("temperature", "0"), ("max-tokens", "30")):
                driver.find_element(By.ID, field).clear()
                driver.find_element(By.ID, field).send_keys(value)
            driver.find_element(By.ID, "input").send_keys("about a dog\n")
            WebDriverWait(driver, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant")
                                            and d.find_element(By.ID, "send").is_enabled())
            reply = driver.execute_script("return document.querySelector('.assistant').textContent")
            assert reply == want and driver.find_elements(By.CSS_SELECTOR, ".error") == []
        finally:
            driver.quit()
