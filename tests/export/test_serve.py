"""`shoal serve`: requests that arrive together share one forward pass and each gets its own
rows' answer; bad bodies get a 400 naming the problem."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import torch

from shoal.export.consolidate import consolidate
from shoal.export.serve import Batcher, make_server
from tests.conftest import wait_for
from tests.export.conftest import FEATURES


def test_requests_queued_together_share_one_batch(classifier):
    loaded = consolidate(classifier[0], progress=False)
    batcher = Batcher(loaded, max_batch=64, max_wait_ms=0)
    requests = [torch.randn(n, FEATURES, generator=torch.Generator().manual_seed(n)) for n in (1, 2, 3, 4)]
    results = [None] * len(requests)

    def ask(i):
        results[i] = batcher.submit(requests[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    wait_for(lambda: batcher.requests.qsize() == len(requests), 30, "every request queued")
    batcher.start()  # only now: all four are waiting, so one pass must answer them all
    for thread in threads:
        thread.join()
    batcher.stop()
    assert batcher.batch_sizes == [10]
    with torch.no_grad():
        for rows, result in zip(requests, results):
            expected = torch.softmax(loaded.model(rows), -1).numpy()
            np.testing.assert_allclose(np.array(result["probabilities"]), expected, atol=1e-6)
            assert result["prediction"] == expected.argmax(1).tolist()


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_answers_and_refuses_bad_rows(classifier):
    loaded = consolidate(classifier[0], progress=False)
    server, batcher = make_server(loaded, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(url + "/health", timeout=30) as reply:
            assert json.loads(reply.read())["features"] == FEATURES
        rows = [[0.5] * FEATURES, [-1.0] * FEATURES]
        status, body = post(url + "/predict", json.dumps({"rows": rows}).encode())
        assert status == 200
        with torch.no_grad():
            expected = torch.softmax(loaded.model(torch.tensor(rows)), -1).numpy()
        np.testing.assert_allclose(np.array(body["probabilities"]), expected, atol=1e-6)
        status, body = post(url + "/predict", json.dumps({"rows": [[1.0] * (FEATURES + 1)]}).encode())
        assert status == 400 and f"{FEATURES} numbers" in body["error"]
        status, body = post(url + "/predict", b"{not json")
        assert status == 400 and "rows" in body["error"]
    finally:
        server.shutdown()
        server.server_close()
        batcher.stop()
