"""download.py against an HTTP server on 127.0.0.1 that serves files this test writes."""

import hashlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import ROOT

import download


class Server:
    """Serves bytes by path, with Range requests; logs (path, Range header); can drop or throttle a file,
    or serve it without Content-Length (HTTP/1.0: the body ends where the connection closes)."""

    def __init__(self):
        self.files, self.log, self.drop_after, self.slow, self.unsized = {}, [], {}, set(), set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.log.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                if self.path not in server.unsized:
                    self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                cut = server.drop_after.pop(self.path, None)  # drop this file's connection once
                payload = body[start:cut] if cut is not None else body[start:]
                try:
                    for i in range(0, len(payload), 4096):
                        self.wfile.write(payload[i:i + 4096])
                        if self.path in server.slow:
                            self.wfile.flush()
                            time.sleep(0.01)
                except (BrokenPipeError, ConnectionResetError):  # the client stopped reading, as it may
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # poll_interval: how long close() waits for the serving thread to notice shutdown()
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def entry(server, path, body, *urls, **extra):
    """A FILES row for body, served at path (and listed under the given URL paths)."""
    server.files[f"/{path}"] = body
    return {"part": "model", "path": path, "urls": [server.url + u for u in (urls or [f"/{path}"])],
            "size": len(body), "sha256": hashlib.sha256(body).hexdigest(), **extra}


def blob(n, seed):
    return bytes((i * seed + i // 7) % 251 for i in range(n))


@pytest.fixture
def fast(monkeypatch):
    """No real backoff waits in tests."""
    monkeypatch.setattr(download.time, "sleep", lambda s: None)


def test_clean_download_then_nothing_then_force(tmp_path, server, monkeypatch, capsys, fast):
    files = [entry(server, "bert-base-uncased/vocab.txt", blob(300_000, 3)),
             entry(server, "ag_news/train.csv", blob(5_000, 5))]
    monkeypatch.setattr(download, "FILES", files)
    assert download.main(["--dest", str(tmp_path)]) == 0
    assert (tmp_path / "bert-base-uncased" / "vocab.txt").read_bytes() == blob(300_000, 3)
    assert not list(tmp_path.rglob("*.part"))
    assert capsys.readouterr().out.strip().endswith("2 fetched, 0 already present and verified. "
                                                    "Next: python train.py --pool max --freeze backbone")
    server.log.clear()
    assert download.main(["--dest", str(tmp_path)]) == 0  # a second run does nothing
    assert server.log == [] and "0 fetched, 2 already present" in capsys.readouterr().out
    assert download.main(["--dest", str(tmp_path), "--force"]) == 0
    assert [path for path, _ in server.log] == ["/bert-base-uncased/vocab.txt", "/ag_news/train.csv"]


def test_resume_after_a_dropped_connection(tmp_path, server, monkeypatch, fast):
    body = blob(1_000_000, 7)
    files = [entry(server, "bert-base-uncased/model.safetensors", body)]
    server.drop_after["/bert-base-uncased/model.safetensors"] = 400_000
    monkeypatch.setattr(download, "FILES", files)
    assert download.main(["--dest", str(tmp_path)]) == 0
    assert (tmp_path / "bert-base-uncased" / "model.safetensors").read_bytes() == body
    # The second request asks only for what the first did not deliver.
    assert server.log == [("/bert-base-uncased/model.safetensors", None),
                          ("/bert-base-uncased/model.safetensors", "bytes=400000-")]


def test_checksum_mismatch_removes_the_file_and_exits_2(tmp_path, server, monkeypatch, capsys, fast):
    good = entry(server, "ag_news/test.csv", blob(10_000, 9))
    served = blob(10_000, 11)
    server.files["/ag_news/test.csv"] = served  # same size, other bytes
    monkeypatch.setattr(download, "FILES", [good])
    assert download.main(["--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"sha256 {hashlib.sha256(served).hexdigest()}, expected {good['sha256']}; the file was removed" in err
    assert not (tmp_path / "ag_news" / "test.csv").exists() and not list(tmp_path.rglob("*.part"))


def test_falls_back_to_the_next_source_after_a_404(tmp_path, server, monkeypatch, fast):
    body = blob(20_000, 13)
    files = [entry(server, "conll2003/valid.txt", body, "/gone/valid.txt", "/conll2003/valid.txt")]
    monkeypatch.setattr(download, "FILES", files)
    assert download.main(["--dest", str(tmp_path)]) == 0
    assert [path for path, _ in server.log] == ["/gone/valid.txt", "/conll2003/valid.txt"]
    assert (tmp_path / "conll2003" / "valid.txt").read_bytes() == body


def conll_archive(server, text, member_text):
    """A served zip holding member_text as conll2003/train.txt, and an entry pinning text and the zip."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("conll2003/train.txt", member_text)
    server.files["/conll2003.zip"] = archive.getvalue()
    pin = {"url": server.url + "/conll2003.zip", "size": len(archive.getvalue()),
           "sha256": hashlib.sha256(archive.getvalue()).hexdigest()}
    return {"part": "conll2003", "path": "conll2003/train.txt", "urls": [server.url + "/missing/train.txt"],
            "archive": pin, "size": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest()}


CONLL_TEXT = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\nPeter NNP B-NP B-PER\n"


def test_falls_back_to_the_pinned_archive_and_keeps_its_copy(tmp_path, server, monkeypatch, fast):
    pinned = conll_archive(server, CONLL_TEXT, CONLL_TEXT + "\n")  # the archive's copy: one newline more
    monkeypatch.setattr(download, "FILES", [pinned])
    assert download.main(["--dest", str(tmp_path)]) == 0
    assert (tmp_path / "conll2003" / "train.txt").read_text() == CONLL_TEXT + "\n"
    requests = len(server.log)
    assert download.main(["--dest", str(tmp_path)]) == 0  # the archive's copy counts as present
    assert len(server.log) == requests


def test_an_archive_that_is_not_the_pinned_one_is_refused(tmp_path, server, monkeypatch, fast, capsys):
    pinned = conll_archive(server, CONLL_TEXT, CONLL_TEXT)
    pinned["archive"]["sha256"] = "0" * 64
    monkeypatch.setattr(download, "FILES", [pinned])
    assert download.main(["--dest", str(tmp_path)]) == 2
    assert "conll2003.zip: sha256 " in capsys.readouterr().err
    assert not (tmp_path / "conll2003" / "train.txt").exists()
    assert not (tmp_path / ".downloads" / "conll2003.zip").exists()  # removed, not kept for next time


def test_a_corrupted_conll_file_is_refused_from_any_source(tmp_path, server, monkeypatch, fast, capsys):
    """One byte changed keeps the size and the sentence count; only the sha256 tells, and it is enough."""
    pinned = conll_archive(server, CONLL_TEXT, CONLL_TEXT)
    server.files.pop("/conll2003.zip")  # no fallback: the primary copy alone decides
    corrupted = CONLL_TEXT.replace("EU", "EV")
    server.files["/conll2003/train.txt"] = corrupted.encode()
    pinned["urls"] = [server.url + "/conll2003/train.txt"]
    monkeypatch.setattr(download, "FILES", [pinned])
    assert download.main(["--dest", str(tmp_path)]) == 2
    assert f"sha256 {hashlib.sha256(corrupted.encode()).hexdigest()}, expected" in capsys.readouterr().err
    assert download.main(["--dest", str(tmp_path), "--mirror", server.url]) == 2  # nor from a mirror
    assert not (tmp_path / "conll2003" / "train.txt").exists()


def test_mirror_serves_paths_under_dest(tmp_path, server, monkeypatch, fast):
    files = [entry(server, "ag_news/train.csv", blob(1_000, 17), "/not/used.csv")]
    monkeypatch.setattr(download, "FILES", files)
    assert download.main(["--dest", str(tmp_path), "--mirror", server.url + "/"]) == 0
    assert [path for path, _ in server.log] == ["/ag_news/train.csv"]


def test_unreachable_host_is_one_clear_message(tmp_path, monkeypatch, capsys):
    files = [{"part": "model", "path": "bert-base-uncased/vocab.txt", "urls": ["http://127.0.0.1:9/vocab.txt"],
              "size": 10, "sha256": "0" * 64}]  # port 9 (discard): nothing listens
    monkeypatch.setattr(download, "FILES", files)
    start = time.monotonic()
    assert download.main(["--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - start < 60
    assert "cannot reach 127.0.0.1 (Connection refused)" in err
    assert f"Without a network, place the files by hand: {tmp_path}/bert-base-uncased/{{vocab.txt}}" in err


def test_the_pins_table():
    assert {e["part"] for e in download.FILES} == set(download.PARTS)
    paths = [e["path"] for e in download.FILES]
    assert len(paths) == len(set(paths)) == 9 + 5 + 4 + 3  # the default 9; the optional backbones and STS-B
    assert len(download.selected(None)) == 9
    for e in download.FILES:
        assert e["urls"] and all(u.startswith("https://") for u in e["urls"])
        has_hash = isinstance(e.get("size"), int) and len(e.get("sha256", "")) == 64
        assert has_hash or e.get("check") in ("config", "tokenizer"), e["path"]
    sizes = {e["path"]: e.get("size") for e in download.FILES}
    assert sizes["bert-base-uncased/model.safetensors"] == 440_449_768
    archives = {e["path"]: e["archive"] for e in download.FILES if "archive" in e}
    assert sorted(archives) == ["conll2003/test.txt", "conll2003/train.txt", "conll2003/valid.txt"]
    assert all(a == {"url": "https://data.deepai.org/conll2003.zip", "size": 982_975,
                     "sha256": "96a104d174ddae7558bab603f19382c5fe02ff1da5c077a7f3ce2ced1578a2c3"}
               for a in archives.values())


CHILD = """
import sys, download
download.FILES = [{{"part": "model", "path": "bert-base-uncased/model.safetensors", "urls": ["{url}"],
                   "size": {size}, "sha256": "{sha}"}}]
sys.exit(download.main(["--dest", "{dest}"]))
"""


def test_sigkill_mid_file_leaves_only_part_and_the_next_run_completes(tmp_path, server):
    body = blob(2_000_000, 19)
    e = entry(server, "bert-base-uncased/model.safetensors", body)
    server.slow.add("/bert-base-uncased/model.safetensors")
    code = CHILD.format(url=e["urls"][0], size=e["size"], sha=e["sha256"], dest=tmp_path)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stderr=subprocess.DEVNULL)
    part = tmp_path / "bert-base-uncased" / "model.safetensors.part"
    deadline = time.monotonic() + 30
    while not (part.exists() and part.stat().st_size > 100_000) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "bert-base-uncased" / "model.safetensors").exists()
    held = part.stat().st_size
    assert 0 < held < len(body)
    server.slow.clear()
    server.log.clear()
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=False).returncode == 0
    assert (tmp_path / "bert-base-uncased" / "model.safetensors").read_bytes() == body
    assert server.log[0][1] == f"bytes={held}-"  # it resumed, and fetched nothing twice


def test_optional_backbones_are_fetched_only_when_named():
    import re
    assert {e["part"] for e in download.selected(None)} == {"model", "ag_news", "conll2003"}
    for name, files in (("roberta-base", {"config.json", "model.safetensors", "tokenizer.json", "vocab.json",
                                          "merges.txt"}),
                        ("distilbert-base-uncased", {"config.json", "model.safetensors", "tokenizer.json",
                                                     "vocab.txt"})):
        entries = download.selected(name)
        assert {e["path"] for e in entries} == {f"{name}/{f}" for f in files}
        for e in entries:  # an immutable revision, a size and a sha256 for every file
            assert re.fullmatch(r"https://huggingface\.co/[\w-]+/" + name + r"/resolve/[0-9a-f]{40}/[\w.]+",
                                e["urls"][0]), e["urls"][0]
            assert e["size"] > 0 and re.fullmatch(r"[0-9a-f]{64}", e["sha256"])


def test_a_mirror_that_is_not_a_url_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        download.main(["--dest", str(tmp_path), "--mirror", "notaurl"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(": error: argument --mirror: 'notaurl' is not an "
                                                             "http:// or https:// URL")
    assert list(tmp_path.iterdir()) == []


def test_a_host_that_never_answers_fails_soon_and_says_what_it_waits_for(tmp_path, monkeypatch, capsys, fast):
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the kernel's backlog; nothing ever reads or replies
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    files = [{"part": "ag_news", "path": f"ag_news/{name}", "urls": [f"{url}/{name}"], "size": 10,
              "sha256": "0" * 64} for name in ("train.csv", "test.csv")]
    monkeypatch.setattr(download, "FILES", files)
    monkeypatch.setattr(download, "TIMEOUT", 0.3)
    start = time.monotonic()
    try:
        assert download.main(["--dest", str(tmp_path)]) == 2
    finally:
        silent.close()
    assert time.monotonic() - start < download.TRIES * 0.3 + 5  # one file's tries, not two files' worth
    err = capsys.readouterr().err
    assert err.startswith("  ag_news/train.csv: asking 127.0.0.1\n")
    assert "(try 2 of 3; last: no answer in 0.3 s)" in err
    assert "127.0.0.1 does not answer (3 tries: no answer in 0.3 s)" in err
    assert "ag_news/test.csv: asking" not in err  # the host's other file was not tried


def test_a_file_of_the_wrong_size_is_never_good(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    pin = {"size": 10, "sha256": hashlib.sha256(b"abc").hexdigest()}
    assert download.problem(path, pin) == "size 3 bytes, expected 10"
    assert download.problem(path, {**pin, "size": 3}) is None


@pytest.mark.parametrize("mirror, why", [
    ("http://[::1", "'http://[::1' is not a valid URL (Invalid IPv6 URL)"),
    ("http://", "'http://' names no host"),
    ("{url}/a b", "'{url}/a b' contains whitespace or a control character (in a path, write a space as %20)"),
    ("http://127.0.0 .1/", "'http://127.0.0 .1/' contains whitespace or a control character (in a path, write a "
                           + "space as %20)"),
    ("http://127.0.0.1:99999/", "'http://127.0.0.1:99999/' is not a valid URL (Port out of range 0-65535)"),
    ("http://[::1]x/", "'http://[::1]x/' has a malformed host or port"),
    ("{url}/?v=1", "'{url}/?v=1' has a query or fragment; a mirror is a base URL that file paths are appended to"),
], ids=["unclosed-ipv6", "no-host", "space-in-path", "space-in-host", "port-out-of-range", "text-after-ipv6",
        "query"])
def test_a_mirror_that_cannot_work_is_refused_before_any_download(tmp_path, server, mirror, why):
    dest = tmp_path / "data"
    done = subprocess.run([sys.executable, "download.py", "--dest", str(dest), "--only", "stsb",
                           "--mirror", mirror.format(url=server.url)], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if "error" in line] == \
        [f"download.py: error: argument --mirror: {why.format(url=server.url)}"]
    assert server.log == [] and not dest.exists()  # nothing asked for, nothing written


def error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


def wrong_size_line(tmp_path, server, served):
    """The one error line for ag_news/test.csv, pinned at 10,000 bytes, when the mirror serves another size."""
    return (f"error: {tmp_path}/ag_news/test.csv: {server.url}/ag_news/test.csv: serves {served} bytes, "
            "but the pinned file has 10,000; the partial file was removed")


@pytest.mark.parametrize("served", [8_000, 12_000])
def test_a_mirror_file_of_another_size_is_refused_at_once(tmp_path, server, monkeypatch, capsys, fast, served):
    monkeypatch.setattr(download, "FILES", [entry(server, "ag_news/test.csv", blob(10_000, 23))])
    server.files["/ag_news/test.csv"] = blob(served, 23)  # a whole file, with its own Content-Length
    assert download.main(["--dest", str(tmp_path), "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err) == [wrong_size_line(tmp_path, server, f"{served:,}")]
    assert server.log == [("/ag_news/test.csv", None)]  # not retried: a second try gets the same file
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["ag_news"]


def test_a_resumed_file_whose_total_is_not_the_pin_is_refused(tmp_path, server, monkeypatch, capsys, fast):
    pinned = blob(10_000, 29)
    monkeypatch.setattr(download, "FILES", [entry(server, "ag_news/test.csv", pinned)])
    server.files["/ag_news/test.csv"] = pinned + b"more rows\n"  # answers the Range with "bytes 4000-10009/10010"
    (tmp_path / "ag_news").mkdir()
    (tmp_path / "ag_news" / "test.csv.part").write_bytes(pinned[:4_000])
    assert download.main(["--dest", str(tmp_path), "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err) == [wrong_size_line(tmp_path, server, "10,010")]
    assert server.log == [("/ag_news/test.csv", "bytes=4000-")]
    assert list((tmp_path / "ag_news").iterdir()) == []


def test_a_file_without_a_stated_size_that_runs_past_the_pin_is_refused(tmp_path, server, monkeypatch, capsys,
                                                                        fast):
    monkeypatch.setattr(download, "FILES", [entry(server, "ag_news/test.csv", blob(10_000, 31))])
    server.files["/ag_news/test.csv"] = blob(30_000, 31)
    server.unsized.add("/ag_news/test.csv")
    assert download.main(["--dest", str(tmp_path), "--mirror", server.url]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert error_lines(err) == [wrong_size_line(tmp_path, server, "more than 10,000")]
    assert len(server.log) == 1 and list((tmp_path / "ag_news").iterdir()) == []


def test_a_file_without_a_stated_size_that_ends_early_is_resumed(tmp_path, server, monkeypatch, fast):
    """With no size to compare, a short body is a dropped connection: kept, and resumed with a Range."""
    body = blob(10_000, 37)
    monkeypatch.setattr(download, "FILES", [entry(server, "ag_news/test.csv", body)])
    server.unsized.add("/ag_news/test.csv")
    server.drop_after["/ag_news/test.csv"] = 6_000
    assert download.main(["--dest", str(tmp_path), "--mirror", server.url]) == 0
    assert (tmp_path / "ag_news" / "test.csv").read_bytes() == body
    assert server.log == [("/ag_news/test.csv", None), ("/ag_news/test.csv", "bytes=6000-")]
