"""`tunelab serve` through the official openai client, on loopback: each model (the base, two LoRA runs, a soft-prompt
run, all over one stories260K base) answers exactly as `tunelab generate` answers for its run, streamed or not; the
ids the server feeds the model are `tunelab generate`'s; 32 concurrent streams equal the sequential answers; every bad
request gets OpenAI's error shape and the server lives on."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.serve.conftest import QA
from tunelab.cli import main
from tunelab.config import validate_config
from tunelab.evaluate.generate import encode_prompts
from tunelab.serve.pool import load_pool
from tunelab.serve.server import running

MAX_TOKENS = 12
TEXTS = [QA[0]["question"], "Tell me a story.", "Once upon a time there was a little dog who", "Hi"]


@pytest.fixture(scope="module")
def pool(stories260k, serve_runs):
    return load_pool(str(stories260k), [(name, str(path)) for name, path in serve_runs.items()], name="base")


@pytest.fixture(scope="module")
def server(pool):
    with running(pool) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def generated(tmp_path_factory, stories260k, serve_runs):
    """`tunelab generate` (the command, one prompt at a time) on each served model: {(model, text): row}."""
    out = {}
    folder = tmp_path_factory.mktemp("generate")
    for name, path in {"base": stories260k, **serve_runs}.items():
        file = folder / f"{name}.jsonl"
        args = ["generate", str(path), "--max-new-tokens", str(MAX_TOKENS), "--batch-size", "1", "--output", str(file)]
        assert main(args + [a for t in TEXTS for a in ("--prompt", t)]) == 0
        for text, line in zip(TEXTS, file.read_text().splitlines()):
            out[name, text] = json.loads(line)
    return out


def test_models_lists_the_base_and_each_adapter(client):
    assert sorted(m.id for m in client.models.list().data) == ["base", "chat", "qa", "soft"]


@pytest.mark.parametrize("model", ["base", "chat", "qa", "soft"])
def test_prompt_ids_are_tunelab_generates(client, pool, generated, model):
    tok = pool.get(model).em.tokenizer
    for text in TEXTS:
        expected = encode_prompts(tok, [generated[model, text]["prompt"]])[0]
        for endpoint in ("chat", "completions"):
            if endpoint == "chat":
                r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                   max_tokens=1, temperature=0, extra_body={"return_prompt": True})
            else:
                r = client.completions.create(model=model, prompt=text, max_tokens=1, temperature=0,
                                              extra_body={"return_prompt": True})
            extra = r.model_extra["tunelab"]
            assert extra["prompt"] == generated[model, text]["prompt"], (model, endpoint, text)
            assert extra["prompt_ids"] == expected and r.usage.prompt_tokens == len(expected)


def _training_prompt_ids(run_dir, record_index, tokenizer):
    """The prompt tokens of one record of a run's training data as training encoded it."""
    from tests.evaluate.test_generate_cli import _training_prompt_ids as training_prompt_ids
    from tunelab.runfiles import read_config_tree

    return training_prompt_ids(validate_config(read_config_tree(run_dir)), record_index, tokenizer)


def test_a_system_turn_renders_as_in_training(client, pool, serve_runs):
    tok = pool.get("chat").em.tokenizer
    for i in (0, 3):
        r = client.chat.completions.create(model="chat", max_tokens=1, temperature=0, extra_body={"return_prompt": True},
                                           messages=[{"role": "system", "content": "Answer in one word."},
                                                     {"role": "user", "content": QA[i]["question"]}])
        assert r.model_extra["tunelab"]["prompt_ids"] == _training_prompt_ids(serve_runs["chat"], i, tok)


@pytest.mark.parametrize("model", ["base", "chat", "qa", "soft"])
def test_greedy_answers_equal_tunelab_generate_streamed_or_not(client, generated, model):
    answers = {generated[model, t]["output"] for t in TEXTS}
    assert len(answers) > 1  # the prompts matter
    for text in TEXTS:
        want = generated[model, text]
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                              max_tokens=MAX_TOKENS, temperature=0)
        plain = client.completions.create(model=model, prompt=text, max_tokens=MAX_TOKENS, temperature=0)
        assert chat.choices[0].message.content == plain.choices[0].text == want["output"], (model, text)
        tokens = chat.usage.completion_tokens  # the end token counts when the answer ended on one
        assert tokens == want["num_tokens"] + (want["ended_with_eos"] and tokens > want["num_tokens"])
        assert chat.choices[0].finish_reason == ("stop" if want["ended_with_eos"] else "length")
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                                stream_options={"include_usage": True})
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want["output"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == tokens and chunks[-1].usage.prompt_tokens == chat.usage.prompt_tokens
        text_stream = client.completions.create(model=model, prompt=text, max_tokens=MAX_TOKENS, temperature=0,
                                                stream=True)
        assert "".join(c.choices[0].text for c in text_stream) == want["output"]


def test_the_adapters_answer_differently_from_the_base(generated):
    for name in ("chat", "qa", "soft"):
        assert [generated[name, t]["output"] for t in TEXTS] != [generated["base", t]["output"] for t in TEXTS]


def test_the_sse_stream_ends_with_done(server):
    body = {"model": "qa", "prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_a_stop_string_ends_the_answer(client, generated):
    full = generated["base", TEXTS[2]]["output"]
    stop = full[len(full) // 2:][:2]
    assert stop and stop in full
    r = client.completions.create(model="base", prompt=TEXTS[2], max_tokens=MAX_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_a_seed_repeats_a_sample(client):
    def sample(seed):
        return client.completions.create(model="base", prompt="Hi", max_tokens=8, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text
    assert sample(3) == sample(3)
    assert len({sample(s) for s in range(6)}) > 1


def test_32_concurrent_streams_equal_the_sequential_answers(server, client):
    prompts = [(model, f"{QA[i % len(QA)]['question']} {'Tell me more. ' * (i % 5)}")
               for i, model in enumerate(["base", "chat", "qa", "soft"] * 8)]
    sequential = [client.completions.create(model=m, prompt=p, max_tokens=MAX_TOKENS, temperature=0).choices[0].text
                  for m, p in prompts]
    aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)

    async def one(model, prompt):
        stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                                  stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def all_at_once():
        try:
            return await asyncio.gather(*(one(m, p) for m, p in prompts))
        finally:
            await aclient.close()

    before = len(server.app.state.batcher.outcomes)
    assert asyncio.run(all_at_once()) == sequential
    batches = list(server.app.state.batcher.outcomes)[before:]
    assert len(batches) == 32 and max(o.batch_size for o in batches) > 1  # they were batched
    assert {o.model for o in batches if o.batch_size > 1} <= {"base", "chat", "qa", "soft"}


def _error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server, client, pool):
    url = server.url
    with pytest.raises(openai.NotFoundError) as exc:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    err = exc.value.body
    assert err["param"] == "model" and all(name in err["message"] for name in pool.names)
    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "base", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in _error(r)["message"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "base"}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "messages" and "missing" in _error(r)["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "model"
    context = pool.get("base").context_length
    long_prompt = "Once upon a time " * context
    r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": long_prompt}, timeout=30)
    prompt_len = len(encode_prompts(pool.get("base").em.tokenizer,
                                    [pool.get("base").inputs.prompts(pool.get("base").inputs.from_texts([long_prompt]),
                                                                     pool.get("base").em.tokenizer)[0]])[0])
    err = _error(r)
    assert r.status_code == 400 and f"{prompt_len} tokens" in err["message"] and f"{context} tokens" in err["message"]
    assert err["code"] == "context_length_exceeded"
    for bad in ({"max_tokens": 0}, {"max_tokens": context}, {"n": 2}, {"temperature": 3}, {"top_p": 0},
                {"stop": ["a", "b", "c", "d", "e"]}):
        r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "Hi", **bad}, timeout=30)
        assert r.status_code == 400 and _error(r)["param"] == next(iter(bad)), (bad, r.text)
    r = httpx.post(f"{url}/v1/chat/completions", json={"model": "base", "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, timeout=30)
    assert r.status_code == 400 and _error(r)["param"] == "messages"
    r = httpx.get(f"{url}/v1/nowhere", timeout=30)
    assert r.status_code == 404 and _error(r)
    assert client.completions.create(model="base", prompt="Hi", max_tokens=2, temperature=0).choices[0].text is not None


def test_a_full_queue_answers_503_and_a_client_that_leaves_frees_its_row(pool):
    # one row at a time, one waiting: a long streamed answer holds the worker while two more requests arrive
    with running(pool, max_batch=1, max_waiting=1) as srv:
        long = {"model": "base", "prompt": "Tell me a story.", "max_tokens": 400, "temperature": 0, "stream": True}
        batcher = srv.app.state.batcher
        before = len(batcher.outcomes)
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=long, timeout=120) as r:
            lines = r.iter_lines()  # kept: a closed iterator closes the response
            assert next(line for line in lines if line).startswith("data: {")  # it is generating
            waiting = {"model": "base", "prompt": "Hi", "max_tokens": 2, "temperature": 0}

            async def two():
                async with httpx.AsyncClient(base_url=srv.url, timeout=120) as c:
                    first = asyncio.create_task(c.post("/v1/completions", json=waiting))
                    await asyncio.sleep(0.2)  # the first is waiting now
                    busy = await c.post("/v1/completions", json=waiting)
                    r.close()  # the streaming client leaves: its row ends, the waiting request runs
                    return await first, busy

            done, busy = asyncio.run(two())
        assert busy.status_code == 503 and busy.headers["retry-after"] == "1" and _error(busy)["type"] == "server_busy"
        assert done.status_code == 200
        left = next(o for o in list(batcher.outcomes)[before:] if o.max_tokens == 400)
        assert left.cancelled and left.completion_tokens < left.max_tokens
        full = httpx.post(f"{srv.url}/v1/completions", json={**long, "stream": False}, timeout=300).json()
        assert full["usage"]["completion_tokens"] > left.completion_tokens  # it would have gone on
