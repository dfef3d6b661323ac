"""Fetch the pretrained model and both datasets into the data directory, verified.

    python download.py                       # everything, into data/
    python download.py --only conll2003      # one part
    python download.py --only roberta-base   # an optional backbone: roberta-base, distilbert-base-uncased
    python download.py --only stsb           # the STS benchmark, for sentence pairs
    python download.py --mirror URL          # from URL/<path under data/>, e.g. URL/conll2003/train.txt

Every file streams into FILE.part, is checked against its pinned size and
sha256, and only then is renamed into place: a file at its final path is
always a good one. Nothing is accepted because it looks right: the CoNLL
fallback archive must match its own pinned sha256, and a file taken out of
it is accepted as that archive's copy (its files may differ from the primary
copies by a final newline).
An interrupted .part is resumed with an HTTP Range request. Each source is
retried with backoff; when one fails, the next is tried. A server whose file
is not the pinned size (by its Content-Length or Content-Range, or by sending
more) is not retried, and what it sent is removed. --mirror is checked before
anything is fetched. Only the standard library is used for the network.
"""

import argparse
import hashlib
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException, IncompleteRead
from pathlib import Path
from urllib.parse import urlparse

HF = "https://huggingface.co/google-bert/bert-base-uncased/resolve/86b5e0934494bd15c9632b12f734a8a67f723594"
AG = "https://raw.githubusercontent.com/mhjabreel/CharCnn_Keras/master/data/ag_news_csv"
CONLL = ("https://raw.githubusercontent.com/davidsbatista/NER-datasets/"
         "dcb6c7439a7de43abc2448bad5b1d81a47f26c0d/CONLL2003")
# The fallback archive, with the size and sha256 tensorflow/datasets pins for it
# (tensorflow_datasets/text/conll2003/checksums.tsv); it holds train.txt, valid.txt, test.txt.
CONLL_ZIP = {"url": "https://data.deepai.org/conll2003.zip", "size": 982_975,
             "sha256": "96a104d174ddae7558bab603f19382c5fe02ff1da5c077a7f3ce2ced1578a2c3"}
ROBERTA = "https://huggingface.co/FacebookAI/roberta-base/resolve/e2da8e2f811d1448a5b465c236feacd80ffbac7b"
DISTILBERT = ("https://huggingface.co/distilbert/distilbert-base-uncased/resolve/"
              "12040accade4e8a0f71eabdb258fecc2e7e948be")
# The STS benchmark (Cer et al., 2017) as its original release has it: a copy in a public repository.
STSB = ("https://raw.githubusercontent.com/aivilmo/textual-similarity/"
        "e8be98008070f338704d34c5bb8771c40cc5c5cc/stsbenchmark")


def _pinned(part, base, files):
    """Entries for one model folder: {file name: (size, sha256)} under the pinned revision at base."""
    return [{"part": part, "path": f"{part}/{name}", "urls": [f"{base}/{name}"], "size": size, "sha256": sha256}
            for name, (size, sha256) in files.items()]


# The one table of what to fetch. path: where it goes under --dest. A file is
# good when its size and sha256 match, or when it is the copy held in its
# pinned "archive"; "check" names a content check for files without a pinned
# hash (the model's config.json and tokenizer.json).
FILES = [
    {"part": "model", "path": "bert-base-uncased/model.safetensors", "urls": [f"{HF}/model.safetensors"],
     "size": 440_449_768, "sha256": "68d45e234eb4a928074dfd868cead0219ab85354cc53d20e772753c6bb9169d3"},
    {"part": "model", "path": "bert-base-uncased/vocab.txt", "urls": [f"{HF}/vocab.txt"],
     "size": 231_508, "sha256": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"},
    {"part": "model", "path": "bert-base-uncased/config.json", "urls": [f"{HF}/config.json"], "check": "config"},
    {"part": "model", "path": "bert-base-uncased/tokenizer.json", "urls": [f"{HF}/tokenizer.json"],
     "check": "tokenizer"},
    {"part": "ag_news", "path": "ag_news/train.csv", "urls": [f"{AG}/train.csv"],
     "size": 29_470_338, "sha256": "76a0a2d2f92b286371fe4d4044640910a04a803fdd2538e0f3f29a5c6f6b672e"},
    {"part": "ag_news", "path": "ag_news/test.csv", "urls": [f"{AG}/test.csv"],
     "size": 1_857_427, "sha256": "521465c2428ed7f02f8d6db6ffdd4b5447c1c701962353eb2c40d548c3c85699"},
    {"part": "conll2003", "path": "conll2003/train.txt", "urls": [f"{CONLL}/train.txt"], "archive": CONLL_ZIP,
     "size": 3_283_418, "sha256": "c99b26852dabf57ca9d30a0e892b84544cc8962003151e14a71077c55dc66db5"},
    {"part": "conll2003", "path": "conll2003/valid.txt", "urls": [f"{CONLL}/valid.txt"], "archive": CONLL_ZIP,
     "size": 827_441, "sha256": "f1f6469322876887de1d04acd43c59b02f59d5b02acf42c027132fa1bf349cb2"},
    {"part": "conll2003", "path": "conll2003/test.txt", "urls": [f"{CONLL}/test.txt"], "archive": CONLL_ZIP,
     "size": 748_093, "sha256": "82e0c72d262f86ad3e78b15c5d980bbf87cb205aa4bf6d2d97643f463f8d7ff7"},
    # Optional backbones (--only NAME), each a complete model folder: the masked-LM file the hub
    # serves (load_pretrained drops its pre-training head) and the tokenizer files.
    *_pinned("roberta-base", ROBERTA, {
        "config.json": (481, "ef0185e2aae6e06c5f105a285006952c340e20c7dbf43c86ec82601b13fc45e9"),
        "model.safetensors": (498_818_054, "5bde1d28afb363d0103324efeb5afc8b2b397fe5e04beabb9b1ef355255ade81"),
        "tokenizer.json": (1_355_863, "847bbeab6174d66a88898f729d52fa8d355fafe1bea101cf960dd404581df70e"),
        "vocab.json": (898_823, "9e7f63c2d15d666b52e21d250d2e513b87c9b713cfa6987a82ed89e5e6e50655"),
        "merges.txt": (456_318, "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
    }),
    *_pinned("distilbert-base-uncased", DISTILBERT, {
        "config.json": (483, "69c94b0222d5d1f4b0ad027ca7416cdafb98378cbbb8305d0bf47c9365c60c83"),
        "model.safetensors": (267_954_768, "5e3f1108e3cb34ee048634875d8482665b65ac713291a7e32396fb18f6ff0063"),
        "tokenizer.json": (466_062, "ce64fce797c24f68df90b40a3f74f579b336a493db14bd583fd520ea0d8c9a98"),
        "vocab.txt": (231_508, "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
    }),
    *_pinned("stsb", STSB, {  # 5,749, 1,500 and 1,379 sentence pairs
        "sts-train.csv": (906_922, "d52e1db23c2483099f2ff4d9cd80a0f98be6438748b65e21f2f2244da0164ab1"),
        "sts-dev.csv": (255_680, "5d7e944d8b02734b07bfdb5df67db3420c64bed153fcaa1ba47ad03480cf4234"),
        "sts-test.csv": (282_419, "affe45928a66ee5a708531233c95b7dacbbdc57f974f002a3d32ea0180cf816a"),
    }),
]
DEFAULT_PARTS = ("model", "ag_news", "conll2003")  # what a plain `python download.py` fetches
PARTS = DEFAULT_PARTS + ("roberta-base", "distilbert-base-uncased", "stsb")
MIRROR_ENV = "MTB_DOWNLOAD_MIRROR"
CHUNK = 1 << 20
GIVE_UP = (400, 401, 403, 404, 410)  # HTTP errors that another try will not fix


class DownloadError(Exception):
    """A file that could not be fetched or verified; the message is one line."""


class Unreachable(DownloadError):
    """The host did not answer at all: its other files are not tried."""


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def problem(path, entry, copy=None):
    """Why the file at path is not the pinned one, or None if it is. copy: the sha256 of the same
    file in its verified archive (archive_copy), also accepted."""
    if "sha256" in entry:
        size = path.stat().st_size
        digest = sha256_of(path) if size == entry["size"] or copy else None
        if digest is not None and digest in (entry["sha256"], copy):
            return None
        if digest is None:
            return f"size {size:,} bytes, expected {entry['size']:,}"
        return f"sha256 {digest}, expected {entry['sha256']}"
    try:
        if entry["check"] == "config":
            from support.model_folder import read_config
            config = read_config(path)
            if (config.hidden_size, config.num_hidden_layers, config.vocab_size) != (768, 12, 30522):
                return "not bert-base-uncased's config (hidden 768, 12 layers, vocab 30522)"
        else:
            from tokenizers import Tokenizer
            if Tokenizer.from_file(str(path)).get_vocab_size() != 30522:
                return "not bert-base-uncased's tokenizer (30522 entries)"
    except Exception as e:  # any parse failure means a bad file  # noqa: BLE001
        return f"unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    return None


class Progress:
    """Bytes, rate and ETA on one line of stderr, at most 5 times a second."""

    def __init__(self, name, total, start_at):
        self.name, self.total, self.done = name, total, start_at
        self.started, self.start_at, self.shown = time.monotonic(), start_at, 0.0
        self.tty = sys.stderr.isatty()

    def add(self, n):
        self.done += n
        now = time.monotonic()
        if now - self.shown >= (0.2 if self.tty else 10.0):
            self.show(now)

    def show(self, now=None, end=False):
        now = now or time.monotonic()
        self.shown = now
        rate = (self.done - self.start_at) / max(now - self.started, 1e-9)
        total = f"/{self.total / 2**20:,.1f}" if self.total else ""
        eta = f", ETA {(self.total - self.done) / rate:,.0f} s" if self.total and rate > 0 and not end else ""
        line = f"  {self.name}: {self.done / 2**20:,.1f}{total} MB, {rate / 2**20:,.1f} MB/s{eta}"
        print(("\r" if self.tty else "") + line.ljust(70), end="\n" if end or not self.tty else "",
              file=sys.stderr, flush=True)


def read_keeping_partial(response, f):
    """The next block of the body; if the connection drops mid-block, keep what did arrive."""
    try:
        return response.read(CHUNK)
    except IncompleteRead as e:
        f.write(e.partial)
        raise


TIMEOUT = 10.0  # seconds to connect, and then for each read, before a try counts as failed
TRIES = 3  # per file and source; a host that never answers is given up after these (under a minute)


def announced_size(response):
    """The whole file's size as the response states it, or None if it does not: a 206 (the rest of a
    file) states it after the slash of Content-Range, "bytes 400-999/1000"; a 200 in Content-Length."""
    header = response.headers.get("Content-Range" if response.status == 206 else "Content-Length") or ""
    size = header.rpartition("/")[2].strip()
    return int(size) if size.isdigit() else None


def wrong_size(url, part, served, size):
    """Removes part and returns the error to raise for a server whose file is not the pinned size;
    nothing it sent is kept, so no later try or source appends to it."""
    part.unlink(missing_ok=True)
    return DownloadError(f"{url}: serves {served} bytes, but the pinned file has {size:,}; "
                         "the partial file was removed")


def fetch(url, part, size, name, backoff=1.0):
    """Stream url into part, resuming what part already holds; retries with exponential backoff.

    Every try starts with a line naming the host, so a silent host is seen at once. A host
    that never answers a single try is Unreachable: its other files are not tried. A server
    whose file is not the pinned size is not retried: another try would fetch the same wrong file.
    """
    last, host, answered = None, urlparse(url).hostname, False
    for attempt in range(TRIES):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        print(f"  {name}: asking {host}" + (f" (try {attempt + 1} of {TRIES}; last: {last})" if attempt else ""),
              file=sys.stderr, flush=True)
        have = part.stat().st_size if part.exists() else 0
        if size and have >= size:
            return
        request = urllib.request.Request(url, headers={"User-Agent": "multitask-bert-download"})
        if have:
            request.add_header("Range", f"bytes={have}-")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                answered = True
                if have and response.status != 206:  # the server ignored the range: start again
                    have = 0
                served = announced_size(response)
                if size and served not in (None, size):  # a whole file, and not the pinned one
                    raise wrong_size(url, part, f"{served:,}", size)
                progress = Progress(name, size or served, have)
                with open(part, "ab" if have else "wb") as f:
                    while block := read_keeping_partial(response, f):
                        f.write(block)
                        have += len(block)
                        progress.add(len(block))
                        if size and have > size:  # a server that did not state its size sends too much
                            break
                if size and have > size:
                    raise wrong_size(url, part, f"more than {size:,}", size)
                progress.show(end=True)
            if size is None or part.stat().st_size >= size:
                return
            last = f"the connection ended at {part.stat().st_size:,} of {size:,} bytes"
        except urllib.error.HTTPError as e:
            answered = True
            if e.code in GIVE_UP:
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
            if e.code == 416:  # the range is past the end: what we hold is wrong
                part.unlink(missing_ok=True)
            last = f"HTTP {e.code} {e.reason}"
        except urllib.error.URLError as e:
            if isinstance(e.reason, (OSError, str)) and not isinstance(e.reason, TimeoutError):
                host = urlparse(url).hostname
                raise Unreachable(f"cannot reach {host} ({getattr(e.reason, 'strerror', None) or e.reason})") from None
            last = f"no answer in {TIMEOUT:g} s" if isinstance(e.reason, TimeoutError) else str(e.reason)
        except TimeoutError:
            last = f"no answer in {TIMEOUT:g} s"
        except (ConnectionError, HTTPException) as e:
            last = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        except OSError as e:  # writing: a full disk, say
            raise DownloadError(f"{part}: cannot write ({e.strerror}); the partial file stays for a later run") \
                from None
    if not answered:
        raise Unreachable(f"{host} does not answer ({TRIES} tries: {last})")
    raise DownloadError(f"{url}: gave up after {TRIES} tries ({last})")


def archive_path(pin, dest):
    return dest / ".downloads" / Path(urlparse(pin["url"]).path).name


def archive_copy(entry, dest):
    """The sha256 of entry's file inside its archive, when the archive is downloaded and matches its pin."""
    archive = archive_path(entry["archive"], dest) if "archive" in entry else None
    if archive is None or not archive.exists() or problem(archive, entry["archive"]) is not None:
        return None
    try:
        with zipfile.ZipFile(archive) as z:
            match = [n for n in z.namelist() if Path(n).name == Path(entry["path"]).name]
            return hashlib.sha256(z.read(match[0])).hexdigest() if match else None
    except zipfile.BadZipFile:
        return None


def from_archive(pin, member, part, dest, name):
    """Take member out of the pinned zip (downloaded once into dest/.downloads, and verified) into part."""
    url, archive = pin["url"], archive_path(pin, dest)
    archive.parent.mkdir(parents=True, exist_ok=True)
    if not archive.exists():
        fetch(url, archive.with_name(archive.name + ".part"), pin["size"], archive.name)
        os.replace(archive.with_name(archive.name + ".part"), archive)
    if (why := problem(archive, pin)) is not None:
        archive.unlink()
        raise DownloadError(f"{url}: {why}; the archive was removed")
    try:
        with zipfile.ZipFile(archive) as z:
            match = [n for n in z.namelist() if Path(n).name == member]
            if not match:
                raise DownloadError(f"{url}: the archive has no {member}")
            with z.open(match[0]) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        archive.unlink()
        raise DownloadError(f"{url}: not a valid zip archive (removed)") from None


def get(entry, dest, mirror, force, unreachable):
    """Put one file in place. Returns "present" or "fetched"; raises DownloadError."""
    final = dest / entry["path"]
    if final.exists() and not force and problem(final, entry, archive_copy(entry, dest)) is None:
        return "present"
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    if force:
        part.unlink(missing_ok=True)
    sources = [("url", f"{mirror.rstrip('/')}/{entry['path']}")] if mirror else \
        [("url", u) for u in entry["urls"]] + ([("archive", entry["archive"]["url"])] if "archive" in entry else [])
    errors = []
    for kind, url in sources:
        host = urlparse(url).hostname
        if host in unreachable:
            errors.append(f"{host} unreachable")
            continue
        try:
            if kind == "url":
                fetch(url, part, entry.get("size"), entry["path"])
            else:
                from_archive(entry["archive"], final.name, part, dest, entry["path"])
        except Unreachable as e:
            unreachable[host] = str(e)
            errors.append(str(e))
            continue
        except DownloadError as e:
            errors.append(str(e))
            continue
        why = problem(part, entry, archive_copy(entry, dest) if kind == "archive" else None)
        if why is None:
            os.replace(part, final)
            return "fetched"
        part.unlink()  # a wrong file is never kept, not even as .part
        errors.append(f"{url}: {why}; the file was removed")
    raise DownloadError(f"{final}: {'; '.join(errors)}")


def mirror_problem(url):
    """Why url cannot be the --mirror, or None. Checked once, before any download, so that a typo is
    one line saying what is wrong, not a traceback from urllib or a host that "does not answer"."""
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"{url!r} contains whitespace or a control character (in a path, write a space as %20)"
    try:
        parts = urlparse(url)
        port = parts.port  # reading it checks it: a whole number up to 65535
    except ValueError as e:  # an unclosed [ around an IPv6 address, say
        return f"{url!r} is not a valid URL ({e})"
    if parts.scheme not in ("http", "https"):
        return f"{url!r} is not an http:// or https:// URL"
    if not parts.hostname:
        return f"{url!r} names no host"
    # urlparse accepts text around a bracketed address ("[::1]x", "h[::1]"), and port 0; neither can be reached.
    if port == 0 or not re.fullmatch(r"(\[[^\]]*\]|[^\[\]:]+)(:\d*)?", parts.netloc.rpartition("@")[2]):
        return f"{url!r} has a malformed host or port"
    if parts.query or parts.fragment:  # file paths are appended to the URL, which would put them inside these
        return f"{url!r} has a query or fragment; a mirror is a base URL that file paths are appended to"
    return None


def selected(only):
    """The entries --only asks for: one part, or without it the default parts."""
    return [e for e in FILES if (e["part"] == only if only else e["part"] in DEFAULT_PARTS)]


def layout(dest, entries):
    by_folder = {}
    for entry in entries:
        folder, name = entry["path"].split("/")
        by_folder.setdefault(folder, []).append(name)
    return "; ".join(f"{dest / folder}/{{{','.join(names)}}}" for folder, names in by_folder.items())


def main(argv=None):
    p = argparse.ArgumentParser(description="Download bert-base-uncased, AG News and CoNLL-2003 (and on request "
                                            "roberta-base or distilbert-base-uncased), verified.")
    p.add_argument("--dest", default="data", help="where to put them (default: data)")
    p.add_argument("--only", choices=PARTS, help="fetch only this part; roberta-base, distilbert-base-uncased "
                                                "and stsb are fetched only when named here")
    p.add_argument("--force", action="store_true", help="fetch again even files that are present and verified")
    p.add_argument("--mirror", default=os.environ.get(MIRROR_ENV),
                   help=f"fetch every file from MIRROR/<path under dest> instead (or set {MIRROR_ENV})")
    args = p.parse_args(argv)
    if args.mirror is not None and (why := mirror_problem(args.mirror)) is not None:
        p.error(f"argument --mirror: {why}")
    dest = Path(args.dest)
    entries = selected(args.only)
    unreachable, failed, counts = {}, [], {"present": 0, "fetched": 0}
    for entry in entries:
        try:
            counts[get(entry, dest, args.mirror, args.force, unreachable)] += 1
        except DownloadError as e:
            failed.append(str(e))
            print(f"error: {e}", file=sys.stderr)
        except OSError as e:
            failed.append(str(e))
            print(f"error: {dest / entry['path']}: {e.strerror}", file=sys.stderr)
    if failed:
        if unreachable:
            print(f"error: {'; '.join(sorted(set(unreachable.values())))}. Without a network, place the files by hand: "
                  f"{layout(dest, entries)}", file=sys.stderr)
        print(f"{len(failed)} of {len(entries)} file{'s' * (len(entries) > 1)} failed; "
              f"{counts['present'] + counts['fetched']} in place",
              file=sys.stderr)
        return 2
    model = f" --model {dest / args.only}" if args.only not in (None, "stsb", *DEFAULT_PARTS) else ""
    print(f"ready in {dest}: {counts['fetched']} fetched, {counts['present']} already present and verified. "
          f"Next: python train.py{model} --pool max --freeze backbone")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the .part files stay: the next run resumes them
        print("stopped by signal 2; run it again to resume the partial files", file=sys.stderr)
        sys.exit(130)
