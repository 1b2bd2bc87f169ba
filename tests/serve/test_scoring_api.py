"""The completions API's scores and steering against transformers on the converted checkpoint.

logprobs and echo in OpenAI's layout (`tokens`, `token_logprobs`, `top_logprobs`,
`text_offset`), max_tokens 0 (the prompt scored alone, as evaluation harnesses ask), the
penalties and logit_bias, through a real server on 127.0.0.1 over a tiny random model, on the
fast path (continuous batching) and the TF graph (static batches).
"""

import json

import numpy as np
import pytest
import requests
from shared_data import reference

from gpt2tf import encoder
from gpt2tf.decode.engine import SamplingParams
from gpt2tf.decode.generator import Generator
from gpt2tf.serve import app as serve_app
from gpt2tf.serve import schema as serve_schema
from gpt2tf.serve import server as serve_server
from tiny import hf_twin, random_model_dir

torch = reference("torch")
transformers = reference("transformers")

LIMITS = serve_schema.Limits(max_batch=8, queue_size=64, max_tokens_limit=200,
                             max_prompt_tokens=60, max_body_bytes=64_000)
ATOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return random_model_dir(tmp_path_factory.mktemp("api") / "tiny", seed=6)


@pytest.fixture(scope="module")
def hf_model(model_dir, tmp_path_factory):
    return hf_twin(model_dir, tmp_path_factory.mktemp("hf") / "out")


@pytest.fixture(scope="module", params=["auto", "graph"], ids=["fast", "graph"])
def server(model_dir, request):
    with Generator(model_dir, threads=1, engine=request.param) as gen:
        service = serve_app.Service(gen, model_id="tiny", limits=LIMITS)
        with serve_server.serve_in_thread(service.app()) as url:
            yield url, gen


def post(url, **body):
    r = requests.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def _token_id(enc, text: str) -> int:
    """The id of a token as the API shows it (its text, or bytes:\\xNN for a lone byte)."""
    raw = bytes.fromhex(text[6:].replace("\\x", "")) if text.startswith("bytes:") else \
        text.encode()
    (token,) = [t for t in range(enc.n_vocab) if enc.decode_bytes([t]) == raw]
    return token


def hf_logp(hf_model, ids) -> np.ndarray:
    """[T, V] log-probabilities after each token of ids."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


ENC = encoder.Encoder.from_bytes(*encoder.byte_level_vocab(), source="byte-level")
PROMPT = ENC.encode("Hello, world")


def test_echo_with_max_tokens_0_scores_the_prompt(server, hf_model):
    url, gen = server
    got = post(url, prompt=PROMPT, echo=True, max_tokens=0, logprobs=3)["choices"][0]
    assert got["text"] == "Hello, world" and got["finish_reason"] == "length"
    lp = got["logprobs"]
    want = hf_logp(hf_model, PROMPT)
    assert lp["tokens"] == list("Hello, world")
    assert lp["text_offset"] == list(range(len(PROMPT)))
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:],
                               want[np.arange(len(PROMPT) - 1), PROMPT[1:]], atol=ATOL)
    for t, top in enumerate(lp["top_logprobs"][1:]):
        best = np.argsort(-want[t], kind="stable")[:3]
        assert len(top) == 3
        np.testing.assert_allclose(sorted(top.values(), reverse=True), want[t][best], atol=ATOL)


def test_generated_logprobs_are_of_the_models_distribution(server, hf_model):
    url, gen = server
    body = dict(prompt=PROMPT, max_tokens=8, temperature=0.7, seed=3, logprobs=2,
                ignore_eos=True)
    choice = post(url, **body)["choices"][0]
    lp = choice["logprobs"]
    ids = PROMPT + [_token_id(gen.encoder, t) for t in lp["tokens"]]
    # the tokens the server reports are the ones it generated
    assert gen.encoder.decode(ids[len(PROMPT):]) == choice["text"]
    want = hf_logp(hf_model, ids)  # before temperature: the model's own distribution
    n = len(lp["tokens"])
    np.testing.assert_allclose(
        lp["token_logprobs"], want[np.arange(len(PROMPT) - 1, len(PROMPT) - 1 + n),
                                   ids[len(PROMPT):]], atol=ATOL)
    # the same request streamed: the chunks' scores add up to the same lists
    r = requests.post(f"{url}/v1/completions", json={**body, "stream": True}, stream=True,
                      timeout=60)
    chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith(b"data: {")]
    streamed = {k: [v for c in chunks for ch in c["choices"] if ch["logprobs"]
                    for v in ch["logprobs"][k]] for k in lp}
    assert streamed["tokens"] == lp["tokens"] and streamed["text_offset"] == lp["text_offset"]
    np.testing.assert_allclose(streamed["token_logprobs"], lp["token_logprobs"], atol=1e-6)


def test_echo_with_generation_is_one_sequence(server, hf_model):
    url, gen = server
    choice = post(url, prompt=PROMPT, echo=True, max_tokens=4, logprobs=1, temperature=0,
                  ignore_eos=True)["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(PROMPT) + 4
    assert lp["token_logprobs"][0] is None
    assert all(v is not None for v in lp["token_logprobs"][1:])
    # greedy: each generated token is the top alternative at its place
    for t in range(len(PROMPT), len(PROMPT) + 4):
        (best, value), = lp["top_logprobs"][t].items()
        assert best == lp["tokens"][t] and value == pytest.approx(lp["token_logprobs"][t])
    assert lp["text_offset"][len(PROMPT)] == len("Hello, world")


def test_multiple_choice_log_likelihoods_equal_transformers(server, hf_model):
    """What lm-evaluation-harness does through a completions server: send context +
    continuation as token ids with echo, max_tokens 0 and logprobs, and add up the
    continuation's token log-probabilities."""
    url, gen = server
    context = ENC.encode("The cat ")
    choices = [ENC.encode(t) for t in ("sat", "ran", "is here")]
    got, want = [], []
    for cont in choices:
        ids = context + cont
        lp = post(url, prompt=ids, echo=True, max_tokens=0, logprobs=0)["choices"][0]["logprobs"]
        got.append(sum(lp["token_logprobs"][len(context):]))
        logp = hf_logp(hf_model, ids)
        want.append(sum(logp[len(context) - 1 + j, t] for j, t in enumerate(cont)))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.argmax(got) == np.argmax(want)


@pytest.mark.parametrize("steer", [
    {"repetition_penalty": 1.4}, {"no_repeat_ngram_size": 1}, {"presence_penalty": 1.5},
    {"frequency_penalty": 0.8},
    {"logit_bias": {str(ENC.encode("l")[0]): -100, str(ENC.encode(" ")[0]): 5}},
    {"bad_words": ["l", "or"]}, {"min_tokens": 5},
])
def test_penalties_in_the_api_equal_the_library(server, steer):
    url, gen = server
    got = post(url, prompt=PROMPT, max_tokens=12, temperature=0, seed=1, ignore_eos=True,
               **steer)["choices"][0]["text"]
    name = "min_length" if "min_tokens" in steer else next(iter(steer))
    params = SamplingParams(top_k=1, **{name: next(iter(steer.values()))})
    want = gen.generate_tokens(PROMPT, length=12, params=params, seed=1, stop_at_eot=False)[0]
    assert got == gen.encoder.decode(want)
    plain = post(url, prompt=PROMPT, max_tokens=12, temperature=0, seed=1,
                 ignore_eos=True)["choices"][0]["text"]
    if name not in ("min_length",):
        assert got != plain  # it changed something


def test_a_steered_row_beside_plain_rows(server):
    """Concurrent requests, one with penalties: each gets what it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    url, _ = server
    bodies = [dict(prompt=PROMPT, max_tokens=10, seed=i, ignore_eos=True) for i in range(4)]
    bodies[2].update(repetition_penalty=1.5, presence_penalty=1.0, logprobs=2)
    alone = [post(url, **b)["choices"][0] for b in bodies]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: post(url, **b)["choices"][0], bodies))
    assert [c["text"] for c in together] == [c["text"] for c in alone]
    assert together[2]["logprobs"] == alone[2]["logprobs"]
