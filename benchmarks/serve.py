"""Serving: `vlmkit serve` with batching, without it, and `transformers serve`, on real easy-VQA requests.

    python benchmarks/serve.py [--quick] [--run runs/demo] [--concurrency 1 8 32] [--requests N] [--out FILE.json]

Servers, each a subprocess on a free local port (torch on `--threads` threads), all started and warmed up
first; their passes then run in turn (C=1 plain on each server, C=1 stream on each, ...), so a drift of the
machine during the run touches every server alike:

  vlmkit        `vlmkit serve RUN`: its default --max-batch 8: up to 8 requests decode together, waiting ones
                join between decode steps (continuous batching).
  max-batch 1   `vlmkit serve RUN --max-batch 1`: one request at a time, the natural alternative to batching.
  transformers  `transformers serve DIR`, Hugging Face's own OpenAI-compatible server, on RUN exported with
                `vlmkit convert to-hf RUN DIR` (LlavaForConditionalGeneration + processor + chat template).
                When the export or the server fails, the JSON and the table say why and the rest goes on.

Requests: easy-VQA test questions in a seeded shuffle; request k of every pass asks question k, so all servers
and passes answer the same questions. Each is one user message: an image_url part (the PNG as a
data:image/png;base64 URI) and a text part (the question + "\\nAnswer the question using a single word or
phrase.", the model's short-answer prompt); temperature 0 (greedy), max_tokens 8. Bodies are encoded before
any timing.

For each concurrency C (`--concurrency`, default 1, 8, 32) a closed loop of C clients (asyncio + httpx, one
keep-alive connection each, opened before the clock starts) sends `--requests` requests in all (default
max(64, 8*C)); a client sends its next request as soon as its last one is answered. Two passes per C:

  plain    stream=false. requests/s = answered requests / wall time of the pass; latency p50/p99 = send -> the whole
           JSON response read.
  stream   stream=true, the same requests. First token p50/p99 = send -> the first SSE chunk whose delta has
           non-empty content (the role-only chunk that opens the stream does not count).
  answers  accuracy (exact match with the easy-VQA answer, case and surrounding spaces ignored) over every
           answer of both passes, and each server's agreement with vlmkit's answer to the same request of the
           same pass: greedy answers must not depend on batching, padding or the framework.

The client runs on the same cores as the server (a 2-core machine: C=32 clients cost CPU too; the JSON keeps
the client's and the server's CPU seconds of each pass). Each pass first waits for a quiet machine, as
vs_transformers.py does, and is repeated (up to `--retries` times, the least disturbed counts) when other
processes, neither the client nor the server, used more than 10% of the CPU during it.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from base64 import b64encode
from pathlib import Path

# the same machine description and quiet-machine rules as the training/decoding benchmark
from vs_transformers import (
    ANSWER_PROMPT,
    BUSY,
    _busy_cpu_seconds,
    machine_info,
    wait_for_quiet,
)

SERVERS = ("vlmkit", "max-batch-1", "transformers")
JSON_KEYS = {"vlmkit": "vlmkit_serve", "max-batch-1": "vlmkit_serve_max_batch_1",
             "transformers": "transformers_serve"}
LABELS = {"vlmkit": "vlmkit", "max-batch-1": "max-batch 1", "transformers": "transformers"}
JSON_HEADERS = {"content-type": "application/json"}


@dataclasses.dataclass(frozen=True)
class Settings:
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int = 0                # requests per pass; 0: max(min_requests, requests_per_client * C)
    min_requests: int = 64
    requests_per_client: int = 8
    warmup: int = 16                 # requests sent by 8 clients before the first pass (+ 2 streamed)
    max_tokens: int = 8
    threads: int = 2                 # torch threads of every server (OMP_NUM_THREADS)
    retries: int = 1                 # passes run again while other processes used more than BUSY of the CPU
    seed: int = 0                    # the shuffle of the easy-VQA test questions
    startup_timeout_s: float = 300.0

    def requests_at(self, concurrency: int) -> int:
        return self.requests or max(self.min_requests, self.requests_per_client * concurrency)


QUICK = Settings(min_requests=8, requests_per_client=1, warmup=4, retries=0)


# -- requests --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answer: str
    image: str  # a data: URI


def load_questions(count: int, seed: int) -> list[Question]:
    """`count` easy-VQA test questions, the same ones in the same order for every server and pass."""
    import easy_vqa

    questions, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    order = random.Random(seed).sample(range(len(questions)), count)
    images = {}
    for i in order:
        if image_ids[i] not in images:
            png = Path(paths[image_ids[i]]).read_bytes()
            images[image_ids[i]] = "data:image/png;base64," + b64encode(png).decode()
    return [Question(questions[i], answers[i], images[image_ids[i]]) for i in order]


def request_body(question: Question, model: str, settings: Settings, stream: bool) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": question.image}},
               {"type": "text", "text": f"{question.question}\n{ANSWER_PROMPT}"}]
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                       "max_tokens": settings.max_tokens, "stream": stream}).encode()


def normalise(answer: str | None) -> str | None:
    return None if answer is None else answer.strip().lower().rstrip(".")


# -- servers ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def console_script(name: str) -> str:
    """The `name` command of this Python's environment (the venv's, not whichever comes first on PATH)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else (shutil.which(name) or name)


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")


class ServerFailed(RuntimeError):
    pass


class Server:
    """A server subprocess: started on a free port, waited for (GET /health), stopped on exit. Its output goes
    to `log_path`; a failure raises ServerFailed with the end of that log."""

    def __init__(self, argv: list[str], port: int, log_path: Path, settings: Settings):
        self.argv, self.port, self.log_path, self.settings = argv, port, log_path, settings
        self.url = f"http://127.0.0.1:{port}"

    def __enter__(self):
        import httpx

        threads = str(self.settings.threads)
        env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
                   PYTHONUNBUFFERED="1")
        start = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            stdin=subprocess.DEVNULL)
        try:
            while True:
                if self.process.poll() is not None:
                    raise ServerFailed(f"exited with status {self.process.returncode} before answering /health: "
                                       + self.log_tail())
                if time.perf_counter() - start > self.settings.startup_timeout_s:
                    raise ServerFailed(f"no answer on /health after {self.settings.startup_timeout_s:.0f}s: "
                                       + self.log_tail())
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            self.startup_s = time.perf_counter() - start
            try:
                self.model = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                raise ServerFailed(f"GET /v1/models gave no model id ({type(exc).__name__}: {exc})") from None
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def batches(self) -> int | None:
        """vlmkit's count of generated batches (its /health says it); None for other servers."""
        import httpx

        return httpx.get(f"{self.url}/health", timeout=10).json().get("batches")

    def log_tail(self, lines: int = 8) -> str:
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:] if line.strip()) or "(no output)"


def server_argv(name: str, run: str, hf_dir: Path | None, port: int) -> list[str]:
    if name == "transformers":
        return [console_script("transformers"), "serve", str(hf_dir), "--host", "127.0.0.1", "--port", str(port),
                "--device", "cpu", "--log-level", "warning"]
    argv = [sys.executable, "-m", "vlmkit", "serve", run, "--port", str(port), "--log-level", "warning"]
    return argv + (["--max-batch", "1"] if name == "max-batch-1" else [])


def export_to_hf(run: str, out: Path) -> tuple[float, str | None]:
    """`vlmkit convert to-hf RUN OUT`: its seconds, and None or the reason it failed."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vlmkit", "convert", "to-hf", run, str(out)], check=False,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode == 0:
        return time.perf_counter() - start, None
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    reason = lines[-1].removeprefix("vlmkit: error: ") if lines else f"exit status {done.returncode}"
    return time.perf_counter() - start, reason


# -- the client ------------------------------------------------------------------------------------------------
async def send(client, body: bytes, stream: bool) -> dict:
    """One request: latency (send -> the whole response), for streams also the first token's time; the answer,
    or an error."""
    import httpx

    start = time.perf_counter()
    try:
        if not stream:
            response = await client.post("/v1/chat/completions", content=body, headers=JSON_HEADERS)
            latency = time.perf_counter() - start
            if response.status_code != 200:
                return {"error": f"HTTP {response.status_code}: {response.text[:300]}"}
            return {"latency": latency, "answer": response.json()["choices"][0]["message"]["content"]}
        first, pieces = None, []
        async with client.stream("POST", "/v1/chat/completions", content=body, headers=JSON_HEADERS) as response:
            if response.status_code != 200:
                text = (await response.aread())[:300].decode(errors="replace")
                return {"error": f"HTTP {response.status_code}: {text}"}
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line.removeprefix("data:").strip()
                if payload == "[DONE]":
                    break
                event = json.loads(payload)
                if "error" in event:
                    return {"error": f"error event in the stream: {event['error']}"}
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        first = first if first is not None else time.perf_counter() - start
                        pieces.append(text)
        return {"latency": time.perf_counter() - start, "first_token": first, "answer": "".join(pieces)}
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


async def closed_loop(url: str, bodies: list[bytes], concurrency: int, stream: bool, meter=lambda: None
                      ) -> tuple[list[dict], float, tuple]:
    """`concurrency` clients share the requests in order, each sending its next one when its last is answered;
    returns the results in request order, the wall time from the first send to the last answer, and `meter()`
    read just before the first send and just after the last answer."""
    import httpx

    # one client = one httpx client with one keep-alive connection: a shared pool of many connections costs
    # the client CPU that grows with their number, and the client shares the machine with the server
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(httpx.AsyncClient(base_url=url, limits=limits,
                                                                     timeout=httpx.Timeout(600.0)))
                   for _ in range(concurrency)]
        await asyncio.gather(*(client.get("/health") for client in clients))  # open the connections
        results: list[dict] = [{}] * len(bodies)
        indices = iter(range(len(bodies)))

        async def one_client(client) -> None:
            for k in indices:
                results[k] = await send(client, bodies[k], stream)

        before, start = meter(), time.perf_counter()
        await asyncio.gather(*(one_client(client) for client in clients))
        wall, after = time.perf_counter() - start, meter()
        return results, wall, (before, after)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile, linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return None
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def milliseconds(values: list[float]) -> dict:
    ms = [value * 1e3 for value in values]
    return {"p50": percentile(ms, 50), "p99": percentile(ms, 99), "mean": sum(ms) / len(ms) if ms else None,
            "max": max(ms, default=None)}


def run_pass(server: Server, bodies: list[bytes], concurrency: int, stream: bool) -> dict:
    """One timed pass; CPU is counted for the client (this process), the server, and everything else."""
    batches_before = server.batches()
    results, wall, (before, after) = asyncio.run(closed_loop(
        server.url, bodies, concurrency, stream,
        meter=lambda: (_busy_cpu_seconds(), sum(os.times()[:2]), server.cpu_seconds())))
    busy, own, served = (end - begin for end, begin in zip(after, before))
    batches = server.batches()
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    record = {"concurrency": concurrency, "stream": stream, "requests": len(bodies), "errors": len(errors),
              "error_examples": errors[:3], "seconds": wall, "requests_per_s": len(ok) / wall,
              "latency_ms": milliseconds([r["latency"] for r in ok]),
              "client_cpu_s": own, "server_cpu_s": served,
              "foreign_cpu": max(0.0, (busy - own - served) / (wall * os.cpu_count())),
              "answers": [r.get("answer") for r in results],
              "latencies_ms": [round(r["latency"] * 1e3, 2) if "latency" in r else None for r in results]}
    if stream:
        firsts = [r["first_token"] for r in ok if r.get("first_token") is not None]
        record["first_token_ms"] = milliseconds(firsts)
        record["no_content"] = len(ok) - len(firsts)
    if batches is not None and batches_before is not None:
        record["batches"] = batches - batches_before
        record["mean_batch"] = len(ok) / max(1, record["batches"])
    return record


def measure_pass(server: Server, bodies: list[bytes], concurrency: int, stream: bool, settings: Settings,
                 label: str, log=print) -> dict:
    """A pass after waiting for a quiet machine; run again while other processes disturbed it."""
    best = None
    for attempt in range(1 + settings.retries):
        wait_for_quiet(60.0, log=log)
        record = run_pass(server, bodies, concurrency, stream)
        record["attempts"] = attempt + 1
        log(f"{label:<40} {record['seconds']:6.1f}s  {record['requests_per_s']:7.1f} req/s"
            + (f"  {record['errors']} ERRORS" if record["errors"] else "")
            + f"  (other processes: {record['foreign_cpu']:.0%} CPU)")
        if best is None or record["foreign_cpu"] < best["foreign_cpu"]:
            best = record
        if record["foreign_cpu"] <= BUSY:
            break
    return best


def measure_servers(servers: dict[str, tuple[list[str], int]], questions: list[Question], settings: Settings,
                    log_dir: Path, log=print) -> tuple[dict, dict]:
    """Start every server, warm each up, then run the passes interleaved: for each concurrency and mode, one
    pass per server in turn. A slow drift of the machine (measured: whichever server ran its passes second
    was up to 25% slower at C=1, whichever it was) then touches every server alike. Idle servers wait on a
    queue and use no CPU; the quiet-machine check would flag one that did.

    Returns (results by name, failures by name); a server that fails to start is a failure only for
    `transformers` (vlmkit failing stops the benchmark)."""
    results, failures = {}, {}
    with contextlib.ExitStack() as stack:
        running = {}
        for name, (argv, port) in servers.items():
            try:
                running[name] = stack.enter_context(Server(argv, port, log_dir / f"{name}.log", settings))
            except ServerFailed as exc:
                if name != "transformers":
                    raise
                failures[name] = f"not run: `transformers serve` failed: {exc}"
                log(f"\n[transformers] {failures[name]}")
                continue
            server = running[name]
            log(f"\n[{LABELS[name]}] {' '.join(argv)}: up in {server.startup_s:.1f}s, model id {server.model!r}")
        bodies = {name: {stream: [request_body(q, server.model, settings, stream) for q in questions]
                         for stream in (False, True)} for name, server in running.items()}
        warm = min(8, max(settings.concurrency))
        for name, server in running.items():
            asyncio.run(closed_loop(server.url, bodies[name][False][:settings.warmup], warm, stream=False))
            asyncio.run(closed_loop(server.url, bodies[name][True][:2], 1, stream=True))
            results[name] = {"command": servers[name][0], "startup_s": server.startup_s, "model_id": server.model,
                             "passes": {}}
        for concurrency in settings.concurrency:
            count = settings.requests_at(concurrency)
            for stream in (False, True):
                mode = "stream" if stream else "plain"
                for name, server in running.items():
                    results[name]["passes"][f"c{concurrency}_{mode}"] = measure_pass(
                        server, bodies[name][stream][:count], concurrency, stream, settings,
                        f"[{LABELS[name]}] C={concurrency} {mode} ({count} requests)", log)
    return results, failures


# -- summary ---------------------------------------------------------------------------------------------------
ROWS = [  # (metric, label, format); higher is better for requests/s only
    ("requests_per_s", "requests/s", "{:.1f}"),
    ("latency_p50_ms", "latency p50 ms", "{:.1f}"),
    ("latency_p99_ms", "latency p99 ms", "{:.1f}"),
    ("first_token_p50_ms", "first token p50 ms", "{:.1f}"),
    ("first_token_p99_ms", "first token p99 ms", "{:.1f}"),
]


def metrics(result: dict, settings: Settings) -> dict:
    out = {}
    for c in settings.concurrency:
        plain, stream = result["passes"][f"c{c}_plain"], result["passes"][f"c{c}_stream"]
        out[f"requests_per_s_c{c}"] = plain["requests_per_s"]
        out[f"latency_p50_ms_c{c}"] = plain["latency_ms"]["p50"]
        out[f"latency_p99_ms_c{c}"] = plain["latency_ms"]["p99"]
        out[f"first_token_p50_ms_c{c}"] = stream["first_token_ms"]["p50"]
        out[f"first_token_p99_ms_c{c}"] = stream["first_token_ms"]["p99"]
    return out


def answer_checks(results: dict, questions: list[Question]) -> dict:
    """Accuracy of every server over all its answers; agreement of each with vlmkit, request by request."""
    checks = {"accuracy": {}, "agreement_with_vlmkit": {}}
    reference = results.get("vlmkit")
    for name, result in results.items():
        right = total = 0
        for record in result["passes"].values():
            for k, answer in enumerate(record["answers"]):
                if answer is not None:
                    total += 1
                    right += normalise(answer) == normalise(questions[k].answer)
        checks["accuracy"][name] = {"accuracy": right / total if total else None, "correct": right,
                                    "answered": total}
        if reference is None or name == "vlmkit":
            continue
        same, pairs, differ = 0, 0, []
        for key, record in result["passes"].items():
            for k, (ours, theirs) in enumerate(zip(reference["passes"][key]["answers"], record["answers"])):
                if ours is None or theirs is None:
                    continue
                pairs += 1
                if normalise(ours) == normalise(theirs):
                    same += 1
                elif len(differ) < 5:
                    differ.append({"pass": key, "question": questions[k].question, "vlmkit": ours, name: theirs})
        checks["agreement_with_vlmkit"][name] = {"share": same / pairs if pairs else None, "same": same,
                                                 "pairs": pairs, "examples_of_differences": differ}
    return checks


def format_table(report: dict, settings: Settings) -> str:
    measured = [name for name in SERVERS if name in report["metrics"]]
    others = [name for name in measured if name != "vlmkit"] if "vlmkit" in measured else []
    lines = [(f"\n== serving {report['run']}: easy-VQA test questions, temperature 0, max_tokens "
              f"{settings.max_tokens}; servers on {settings.threads} torch threads, clients on the same machine"),
             f"{'metric':<26}" + "".join(f"{LABELS[name]:>14}" for name in measured)
             + "".join(f"{'vs ' + LABELS[name]:>18}" for name in others)]
    for c in settings.concurrency:
        for key, label, fmt in ROWS:
            values = [report["metrics"][name][f"{key}_c{c}"] for name in measured]
            ratios = [report["ratios"][f"vs_{JSON_KEYS[name]}"][f"{key}_c{c}"] for name in others]
            lines.append(f"{f'C={c:<3}{label}':<26}"
                         + "".join(f"{fmt.format(v) if v is not None else '-':>14}" for v in values)
                         + "".join(f"{f'{r:.2f}x' if r is not None else '-':>18}" for r in ratios))
    if others:
        lines.append("ratios: vlmkit's value over the other server's; above 1 is better for requests/s, below 1 "
                     "for times")
    for name in SERVERS:
        if isinstance(report["servers"].get(JSON_KEYS[name]), str):
            lines.append(f"{LABELS[name]}: {report['servers'][JSON_KEYS[name]]}")
    checks = report["checks"]
    lines.append("answers: accuracy " + ", ".join(
        f"{LABELS[name]} {a['accuracy']:.1%} ({a['correct']}/{a['answered']})" if a["accuracy"] is not None
        else f"{LABELS[name]} -" for name, a in checks["accuracy"].items())
        + "".join(f"; agreement with vlmkit: {LABELS[name]} {a['same']}/{a['pairs']}"
                  + ("" if a["same"] == a["pairs"] else " (DIFFER)")
                  for name, a in checks["agreement_with_vlmkit"].items()))
    errors = {name: sum(p["errors"] for p in report["servers"][JSON_KEYS[name]]["passes"].values())
              for name in measured}
    if any(errors.values()):
        lines.append("ERRORS: " + ", ".join(f"{LABELS[name]} {n}" for name, n in errors.items() if n)
                     + " failed requests (examples in the JSON)")
    if "vlmkit" in measured:
        passes = report["servers"][JSON_KEYS["vlmkit"]]["passes"]
        lines.append("vlmkit requests per prefill group (plain/stream): " + ", ".join(
            f"C={c} {passes[f'c{c}_plain'].get('mean_batch', 0):.1f}/{passes[f'c{c}_stream'].get('mean_batch', 0):.1f}"
            for c in settings.concurrency))
    foreign = {f"{name} {key}": record["foreign_cpu"] for name in measured
               for key, record in report["servers"][JSON_KEYS[name]]["passes"].items()}
    if foreign:
        busiest = max(foreign, key=foreign.get)
        lines.append(f"machine: other processes used at most {foreign[busiest]:.0%} of the CPU during a pass "
                     f"({busiest})" + (f"; numbers measured above {BUSY:.0%} are not trustworthy, rerun on a quiet "
                                       "machine" if foreign[busiest] > BUSY else ""))
    return "\n".join(lines)


def summarise(report: dict, results: dict, questions: list[Question], settings: Settings) -> None:
    report["metrics"] = {name: metrics(result, settings) for name, result in results.items()}
    report["ratios"] = {}
    if "vlmkit" in results:
        ours = report["metrics"]["vlmkit"]
        for name in results:
            if name != "vlmkit":
                theirs = report["metrics"][name]
                report["ratios"][f"vs_{JSON_KEYS[name]}"] = {
                    key: ours[key] / theirs[key] if ours[key] is not None and theirs[key] else None for key in ours}
    report["checks"] = answer_checks(results, questions)


def machine(settings: Settings) -> dict:
    import fastapi
    import httpx
    import uvicorn

    return {**machine_info(settings), "fastapi": fastapi.__version__, "uvicorn": uvicorn.__version__,
            "httpx": httpx.__version__}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  VLMKIT_HOME=... python benchmarks/serve.py                 # all servers, C = 1, 8, 32\n"
               "  python benchmarks/serve.py --quick                         # smoke test, under a minute\n"
               "  python benchmarks/serve.py --servers vlmkit max-batch-1 --concurrency 4 16 --requests 200\n\n"
               "The run's backbones are found as for `vlmkit serve` (VLMKIT_HOME for the built-in tiny ones).")
    defaults = Settings()
    parser.add_argument("--run", default="runs/demo", help="run directory or checkpoint to serve (default %(default)s)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                        help="which servers to measure (default: all; vlmkit is the reference of the ratios and of "
                             "the answer agreement)")
    parser.add_argument("--concurrency", nargs="+", type=int, default=None,
                        help=f"numbers of concurrent clients (default {' '.join(map(str, defaults.concurrency))})")
    parser.add_argument("--requests", type=int, default=None,
                        help=f"requests per pass at every concurrency (default max({defaults.min_requests}, "
                             f"{defaults.requests_per_client}*C); with --quick max({QUICK.min_requests}, C))")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"warm-up requests per server (default {defaults.warmup}, {QUICK.warmup} with --quick)")
    parser.add_argument("--max-tokens", type=int, default=None, help=f"default {defaults.max_tokens}")
    parser.add_argument("--threads", type=int, default=None,
                        help=f"torch threads of each server (default {defaults.threads})")
    parser.add_argument("--retries", type=int, default=None,
                        help=f"repeat a pass disturbed by other processes up to this often (default "
                             f"{defaults.retries}, {QUICK.retries} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: max({QUICK.min_requests}, C) requests per pass, {QUICK.warmup} warm-up "
                             "requests, no retries")
    parser.add_argument("--out", default="benchmarks/results/serve.json", help="where the JSON goes (default "
                                                                                "%(default)s)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    overrides = {"concurrency": tuple(args.concurrency) if args.concurrency else None, "requests": args.requests,
                 "warmup": args.warmup, "max_tokens": args.max_tokens, "threads": args.threads,
                 "retries": args.retries}
    settings = dataclasses.replace(QUICK if args.quick else Settings(),
                                   **{key: value for key, value in overrides.items() if value is not None})
    start = time.perf_counter()
    report = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "run": args.run,
              "settings": dataclasses.asdict(settings), "machine": machine(settings),
              "load_average_before": os.getloadavg(), "servers": {}}
    count = max(settings.warmup, *(settings.requests_at(c) for c in settings.concurrency))
    questions = load_questions(count, settings.seed)
    results = {}
    with tempfile.TemporaryDirectory(prefix="vlmkit-serve-bench-") as tmp:
        servers = {}
        for name in args.servers:
            hf_dir = None
            if name == "transformers":
                hf_dir = Path(tmp) / "hf"
                seconds, failure = export_to_hf(args.run, hf_dir)
                report["export_to_hf_s"] = seconds
                if failure:
                    reason = f"not run: `vlmkit convert to-hf {args.run}` failed: {failure}"
                    print(f"\n[transformers] {reason}")
                    report["servers"][JSON_KEYS[name]] = reason
                    continue
            port = free_port()
            while port in {p for _, p in servers.values()}:  # all servers start before any pass
                port = free_port()
            servers[name] = (server_argv(name, args.run, hf_dir, port), port)
        results, failures = measure_servers(servers, questions, settings, Path(tmp))
        for name in args.servers:
            if name in results or name in failures:
                report["servers"][JSON_KEYS[name]] = results.get(name, failures.get(name))
    summarise(report, results, questions, settings)
    report["load_average_after"] = os.getloadavg()
    report["seconds"] = time.perf_counter() - start
    print(format_table(report, settings))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nload average before {report['load_average_before'][0]:.2f}, after "
          f"{report['load_average_after'][0]:.2f}; {report['seconds']:.0f}s -> {out}")
    return report


if __name__ == "__main__":
    main()
