"""`enigma serve`: the OpenAI-compatible endpoints on Ray Serve, read with raw HTTP and with the
`openai` client on loopback: each endpoint, streaming, batching of concurrent requests, the 400s
and the 401, and Ctrl-C leaving no process behind."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest
import torch
from conftest import ROOT, free_port

KEY = "test-key"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A small chat model (its tokenizer carries the template) and a pretrained one (none)."""
    from enigma import EnigmaConfig, EnigmaLM
    from enigma.data.conversations import with_chat_template
    from enigma.data.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("serve")
    torch.manual_seed(0)
    model = EnigmaLM(EnigmaConfig.from_preset("tiny", d=64, num_heads=2, max_len=64))
    for name, template in (("chat", True), ("plain", False)):
        model.save_pretrained(root / name)
        tokenizer = load_tokenizer(quiet=True)
        (with_chat_template(tokenizer) if template else tokenizer).save_pretrained(root / name)
    return root


@pytest.fixture(scope="module")
def server(models):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("ENIGMA_API_KEY", None)
    argv = [sys.executable, "-m", "enigma.cli", "serve", str(models / "chat"), "--port", str(port),
            "--api-key", KEY, "--max-batch-size", "8", "--batch-wait-ms", "200"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("serving "):
            break
    assert seen and seen[-1].startswith("serving "), "".join(seen)[-3000:]
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    yield {"proc": proc, "base": f"http://127.0.0.1:{port}", "line": seen[-1]}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def call(server, path, body=None, key=KEY, raw=None):
    """(status, parsed JSON or the text of a stream)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(server["base"] + path, data=data, method="POST" if data
                                     is not None else "GET")  # fmt: skip
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as err:
        text, status = err.read().decode(), err.code
    return status, (json.loads(text) if not text.startswith("data:") else text)


def test_models_and_a_completion_and_the_key(server):
    assert "127.0.0.1" in server["line"] and "an API key" in server["line"]
    status, listing = call(server, "/v1/models")
    assert status == 200 and listing["data"][0]["id"] == "chat"
    status, refused = call(server, "/v1/models", key=None)
    assert status == 401 and refused["error"]["type"] == "authentication_error"
    status, wrong = call(server, "/v1/completions", {"prompt": "曹操"}, key="other")
    assert status == 401 and wrong["error"]["code"] == "invalid_api_key"
    body = {"model": "chat", "prompt": "话说天下大势", "max_tokens": 5, "temperature": 0}
    status, done = call(server, "/v1/completions", body)
    assert status == 200 and done["object"] == "text_completion"
    assert done["usage"]["completion_tokens"] <= 5 and done["choices"][0]["finish_reason"]
    assert done["usage"]["prompt_tokens"] == 6


def test_a_streamed_chat_reply_read_by_the_openai_client_and_raw(server):
    from openai import OpenAI

    client = OpenAI(base_url=server["base"] + "/v1", api_key=KEY)
    messages = [{"role": "user", "content": "何以破曹？"}]
    whole = client.chat.completions.create(model="chat", messages=messages, max_tokens=6,
                                           temperature=0)  # fmt: skip
    pieces = client.chat.completions.create(model="chat", messages=messages, max_tokens=6,
                                            temperature=0, stream=True)  # fmt: skip
    chunks = list(pieces)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    status, text = call(server, "/v1/completions", {"prompt": "曹操", "max_tokens": 3,
                                                    "stream": True})  # fmt: skip
    events = [e for e in text.split("\n\n") if e]
    assert status == 200 and events[-1] == "data: [DONE]" and len(events) >= 2


@pytest.mark.parametrize(
    ("body", "raw", "param"),
    [
        ({"prompt": "曹操", "max_tokens": 0}, None, "max_tokens"),
        ({"prompt": "曹" * 70, "max_tokens": 4}, None, "max_tokens"),
        ({"prompt": "曹操", "temperature": "hot"}, None, "temperature"),
        ({"prompt": 42}, None, "prompt"),
        (None, b"{not json", None),
        ({"messages": "hello"}, None, "messages"),
    ],
)
def test_bad_requests_are_400s_with_an_openai_error_body(server, body, raw, param):
    path = "/v1/chat/completions" if body and "messages" in body else "/v1/completions"
    status, answer = call(server, path, body, raw=raw)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error"
    assert answer["error"]["param"] == param and answer["error"]["message"]


def test_eight_concurrent_requests_are_answered_in_fewer_model_calls(server):
    _, before = call(server, "/stats")
    results = []
    body = {"prompt": "话说天下大势", "max_tokens": 3, "temperature": 0.7}
    ask = lambda: results.append(call(server, "/v1/completions", body))  # noqa: E731
    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _, after = call(server, "/stats")
    assert [status for status, _ in results] == [200] * 8
    assert after["requests"] - before["requests"] == 8
    assert after["model_calls"] - before["model_calls"] < 8, "batched, not one by one"
    assert after["largest_batch"] > 1


def test_a_model_without_a_template_refuses_chat_naming_it(models):
    from enigma.data.tokenizer import load_tokenizer
    from enigma.serve.app import prompt_ids
    from enigma.serve.requests import RequestError

    plain = load_tokenizer(str(models / "plain"), quiet=True)
    with pytest.raises(RequestError, match="has no chat template") as err:
        prompt_ids(plain, {"messages": [{"role": "user", "content": "你好"}]}, True, "plain")
    assert err.value.status == 400 and err.value.code == "no_chat_template"
    assert err.value.body()["error"]["param"] == "messages"
    assert prompt_ids(plain, {"prompt": "曹操"}, False, "plain") == [3293, 3082]


def test_ctrl_c_stops_the_application_and_the_cluster_it_started(server):
    proc = server["proc"]
    family = psutil.Process(proc.pid).children(recursive=True)
    assert family, "the command started Ray's processes"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"left behind: {[p.pid for p in alive]}"
    time.sleep(0.5)


def test_the_serve_config_file_deploys_the_same_application(models):
    import yaml
    from ray.serve import Application
    from ray.serve.schema import ServeDeploySchema

    from enigma.serve.app import build_app

    config = yaml.safe_load((ROOT / "ray_jobs" / "serve_config.yaml").read_text())
    ServeDeploySchema.model_validate(config)  # what `serve deploy` checks first
    (app,) = config["applications"]
    assert app["import_path"] == "enigma.serve.app:build_app"
    assert isinstance(build_app({**app["args"], "model": str(models / "chat")}), Application)
