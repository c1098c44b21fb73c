"""Compare string-expansion speed and output of exim4 and exim-py with -be.

Both programs get the same config and the same N expansion strings on
standard input, one process each, so the timing includes start-up.  The
outputs are compared line for line; differences are reported, not fatal.

Usage: .venv/bin/python bench/expand_bench.py [--count N] [--exim PATH]
       [--exim-py PATH] [--repeat N] [--show N] [--timeout S] [--dump FILE]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "expand"
DATA_FILES = ("aliases", "domains", "senders", "hosts")
PLACEHOLDER = "/BENCHDIR/"
SEED = 20240601

# Pools of realistic values.  Mixed case and odd forms are deliberate: the
# strings should exercise both the matching and the non-matching paths.
IPV4 = [
    "127.0.0.1", "192.168.1.10", "192.168.254.3", "10.1.2.3", "10.1.2.200",
    "10.1.3.4", "172.16.5.7", "172.16.5.8", "203.0.113.45", "198.51.100.7",
    "8.8.8.8", "1.2.3.4", "100.64.0.1", "169.254.10.20", "172.20.30.40",
]
IPV6 = ["::1", "2001:db8:1::25", "2001:db8:2::1", "fe80::1", "2001:db8:1:ff::abcd"]
IPS = IPV4 + IPV6
DOMAINS = [
    "example.com", "example.org", "mail.example.net", "sub.example.net",
    "example.net", "hosted.example", "customer.example", "mail.partner.example",
    "shop.example", "junk.example", "example.biz", "relay.example",
    "partner.example", "gmail.example", "unknown.test",
]
MIXED_DOMAINS = ["Example.COM", "MAIL.Example.Net", "Hosted.Example", "WWW.Unknown.Test"]
LOCAL_PARTS = [
    "postmaster", "abuse", "root", "alice", "bob", "carol", "dave", "erin",
    "frank", "grace", "heidi", "ivan", "judy", "mallory", "sales", "support",
    "bob.smith", "dave+inbox", "bulk-1234", "newsletter", "noreply", "nobody",
    "spammer", "hostmaster",
]
SENDERS = [
    "alice@example.com", "bob.smith@example.org", "spammer@example.biz",
    "newsletter@shop.example", "noreply@customer.example", "carol@example.net",
    "bulk-77@mailer.example", "someone@junk.example", "ghost@unknown.test",
]
DISPLAY = ["Alice Liddell", "Bob Smith", "\"Support, Team\"", "Carol", "Dr. Who"]
SUBJECTS = [
    "re: your invoice  #1234", "meeting  tomorrow at 10", "FW: quarterly   report",
    "[list] weekly digest", "win a prize!!! now", "hello world", "password reset",
]
# Local parts that need quoting, one with an embedded backslash and quote.
QUOTE_LPS = ["john doe", "a.b", "x..y", "plain", 'with\\\\"quote', "dot.end."]
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def _addr(r: random.Random) -> str:
    return f"{r.choice(LOCAL_PARTS)}@{r.choice(DOMAINS)}"


def _list(r: random.Random, pool: list[str], lo: int = 2, hi: int = 5) -> str:
    return ":".join(r.sample(pool, r.randint(lo, hi)))


# Each template builds one expansion string from the random source and the
# directory holding the lookup files.  None may start with an upper-case
# letter (-be would treat it as a macro definition) or end in a backslash.
Template = Callable[[random.Random, str], str]

TEMPLATES: list[Template] = [
    lambda r, d: f"${{if match_ip{{{r.choice(IPS)}}}{{+relay_hosts}}{{relay}}{{norelay}}}}",
    lambda r, d: (
        f"${{if match_ip{{{r.choice(IPV4)}}}{{127.0.0.0/8 : 10.0.0.0/8 : 192.168.0.0/16}}"
        "{private}{public}}"
    ),
    lambda r, d: (
        f"${{if match_ip{{{r.choice(IPS)}}}{{<; ::1 ; 2001:db8::/32 ; 172.16.0.0/12}}"
        "{yes}{no}}"
    ),
    lambda r, d: f"${{lookup{{{r.choice(LOCAL_PARTS)}}}lsearch{{{d}/aliases}}{{$value}}{{nouser}}}}",
    lambda r, d: (
        f"${{lookup{{{r.choice(LOCAL_PARTS)}}}lsearch*{{{d}/aliases}}"
        "{${address:$value}}{none}}"
    ),
    lambda r, d: (
        f"${{lookup{{{r.choice(DOMAINS)}}}lsearch{{{d}/domains}}"
        "{${extract{transport}{$value}}}{dnslookup}}"
    ),
    lambda r, d: (
        f"${{lookup{{{r.choice(SENDERS)}}}lsearch{{{d}/senders}}"
        "{${if >{${extract{score}{$value}}}{10}{spam}{ham}}}{unknown}}"
    ),
    lambda r, d: f"${{lookup{{{r.choice(IPV4)}}}iplsearch{{{d}/hosts}}{{class=$value}}{{class=none}}}}",
    lambda r, d: (
        f"${{if and{{{{eq{{${{domain:{_addr(r)}}}}}{{example.com}}}}"
        f"{{match{{${{local_part:{_addr(r)}}}}}{{\\N^[a-z]+$\\N}}}}}}"
        "{local-simple}{other}}"
    ),
    lambda r, d: (
        f"${{if or{{{{eqi{{{r.choice(MIXED_DOMAINS)}}}{{example.com}}}}"
        f"{{match_domain{{{r.choice(DOMAINS)}}}{{+relay_domains}}}}}}{{ok}}{{reject}}}}"
    ),
    lambda r, d: f"${{lc:{r.choice(MIXED_DOMAINS)}}}",
    lambda r, d: f"${{uc:{r.choice(LOCAL_PARTS)}}}",
    lambda r, d: f"${{domain:{_addr(r)}}}",
    lambda r, d: f"${{local_part:{_addr(r)}}}",
    lambda r, d: f"${{sg{{{r.choice(SUBJECTS)}}}{{\\N\\s+\\N}}{{_}}}}",
    lambda r, d: f"${{sg{{{_addr(r)}}}{{\\N^([^@]+)@(.*)$\\N}}{{\\$2/\\$1}}}}",
    lambda r, d: f"${{extract{{{r.randint(1, 5)}}}{{:}}{{{_list(r, WORDS, 3, 5)}}}}}",
    lambda r, d: (
        f"${{extract{{{r.choice(['rate', 'action', 'score', 'missing'])}}}"
        f"{{rate={r.randint(1, 500)} action={r.choice(['accept', 'defer'])} score={r.randint(0, 99)}}}"
        "{<$value>}{absent}}"
    ),
    lambda r, d: f"${{if inlist{{{r.choice(LOCAL_PARTS)}}}{{postmaster:abuse:root:hostmaster}}{{admin}}{{user}}}}",
    lambda r, d: f"${{if inlisti{{{r.choice(MIXED_DOMAINS)}}}{{example.com:hosted.example}}{{yes}}{{no}}}}",
    lambda r, d: f"${{if match_domain{{{r.choice(DOMAINS)}}}{{+local_domains}}{{local}}{{remote}}}}",
    lambda r, d: f"${{if match_address{{{r.choice(SENDERS)}}}{{+bad_senders}}{{bad}}{{good}}}}",
    lambda r, d: f"${{if match_local_part{{{r.choice(LOCAL_PARTS)}}}{{+admins}}{{yes}}{{no}}}}",
    lambda r, d: (
        f"${{if forany{{{_list(r, IPV4)}}}{{match_ip{{$item}}{{+relay_hosts}}}}{{some}}{{none}}}}"
    ),
    lambda r, d: (
        f"${{if forall{{{_list(r, DOMAINS)}}}{{match{{$item}}{{\\N\\.example$\\N}}}}{{all}}{{notall}}}}"
    ),
    lambda r, d: f"${{length_{r.randint(1, 12)}:{r.choice(SUBJECTS)}}}",
    lambda r, d: f"${{hash_{r.randint(2, 6)}:{_addr(r)}}}",
    lambda r, d: f"${{hash{{{r.randint(2, 6)}}}{{{r.randint(10, 62)}}}{{{_addr(r)}}}}}",
    lambda r, d: f"${{nhash_{r.randint(8, 64)}:{_addr(r)}}}",
    lambda r, d: f"${{md5:{_addr(r)}}}",
    lambda r, d: f"${{sha256:{r.choice(SUBJECTS)}}}",
    lambda r, d: f"${{sha1:{_addr(r)}}}",
    lambda r, d: f"${{eval:{r.randint(1, 999)}*{r.randint(1, 99)}+{r.randint(-50, 50)}}}",
    lambda r, d: f"${{eval:({r.randint(100, 9999)}-{r.randint(1, 99)})/{r.randint(1, 9)}%{r.randint(2, 17)}}}",
    lambda r, d: f"${{eval:0x{r.randint(0, 0xffff):x} & {r.randint(0, 255)} | 1 << {r.randint(0, 8)}}}",
    lambda r, d: f"${{eval10:0{r.randint(0, 999)}+{r.randint(0, 99)}}}",
    lambda r, d: f"${{if >{{{r.randint(0, 100)}}}{{{r.randint(0, 100)}}}{{big}}{{small}}}}",
    lambda r, d: f"${{if <={{{r.randint(0, 20)}k}}{{{r.randint(0, 20000)}}}{{le}}{{gt}}}}",
    lambda r, d: f"${{listcount:{_list(r, WORDS, 1, 7)}}}",
    lambda r, d: f"${{listextract{{{r.randint(-3, 4)}}}{{{_list(r, WORDS, 3, 5)}}}{{<$value>}}{{none}}}}",
    lambda r, d: f"${{map{{{_list(r, LOCAL_PARTS)}}}{{$item@example.com}}}}",
    lambda r, d: f"${{filter{{{_list(r, DOMAINS, 3, 7)}}}{{match_domain{{$item}}{{+local_domains}}}}}}",
    lambda r, d: f"${{reduce{{{':'.join(str(r.randint(1, 50)) for _ in range(4))}}}{{0}}{{${{eval:$value+$item}}}}}}",
    lambda r, d: f"${{sort{{{_list(r, WORDS, 3, 6)}}}{{lt}}{{$item}}}}",
    lambda r, d: f"${{substr{{{r.randint(0, 6)}}}{{{r.randint(1, 8)}}}{{{_addr(r)}}}}}",
    lambda r, d: f"${{substr_{r.randint(-6, -1)}:{r.choice(SUBJECTS)}}}",
    lambda r, d: f"${{tr{{{_addr(r)}}}{{.@+}}{{_%-}}}}",
    lambda r, d: f"${{quote_local_part:{r.choice(QUOTE_LPS)}}}",
    lambda r, d: f"${{address:{r.choice(DISPLAY)} <{_addr(r)}>}}",
    lambda r, d: f"${{addresses:{r.choice(DISPLAY)} <{_addr(r)}>, {_addr(r)}}}",
    lambda r, d: f"${{mask:{r.choice(IPV4)}/{r.choice([8, 16, 24, 28, 32])}}}",
    lambda r, d: f"${{mask:{r.choice(IPV6)}/{r.choice([32, 48, 64, 128])}}}",
    lambda r, d: f"${{reverse_ip:{r.choice(IPS)}}}",
    lambda r, d: f"${{if isip4{{{r.choice(IPS)}}}{{v4}}{{${{if isip6{{{r.choice(IPS)}}}{{v6}}{{other}}}}}}}}",
    lambda r, d: f"${{if eq{{${{lc:${{domain:{r.choice(LOCAL_PARTS)}@{r.choice(MIXED_DOMAINS)}}}}}}}{{example.com}}{{yes}}{{no}}}}",
    lambda r, d: "${if !def:h_subject:{nosubject}{subject}}",
    lambda r, d: f"${{if exists{{{d}/{r.choice(DATA_FILES + ('missing',))}}}{{present}}{{absent}}}}",
    lambda r, d: f"x-spam-score: ${{eval:{r.randint(0, 30)}*10/3}} (${{length_4:{r.choice(WORDS)}}})",
    lambda r, d: f"${{base62:{r.randint(0, 10**9)}}}",
    lambda r, d: f"${{hex2b64:{r.randint(0, 2**40):010x}}}",
    lambda r, d: f"${{strlen:{r.choice(SUBJECTS)}}}",
    lambda r, d: f"${{rxquote:{r.choice(DOMAINS)}}}",
    lambda r, d: f"${{if match{{{r.choice(SUBJECTS)}}}{{\\N(?i)^(re|fw):\\N}}{{reply}}{{new}}}}",
    lambda r, d: f"${{if crypteq{{secret}}{{\\{{md5\\}}{r.choice(['5ebe2294ecd0e0f08eab7690d2a6ee69', 'x'])}}}{{ok}}{{bad}}}}",
]


def make_strings(count: int, datadir: str) -> list[str]:
    """Cycle the templates in a fixed-seed shuffled order with varied data."""
    rng = random.Random(SEED)
    out: list[str] = []
    order = list(range(len(TEMPLATES)))
    while len(out) < count:
        rng.shuffle(order)
        for i in order:
            if len(out) == count:
                break
            s = TEMPLATES[i](rng, datadir)
            # Guard the -be input rules rather than trusting every template.
            assert "\n" not in s and not s[:1].isupper() and not s.endswith("\\"), s
            out.append(s)
    return out


def prepare(tmp: Path) -> Path:
    """Copy config and lookup files into tmp, substituting the path placeholder."""
    for sub in ("spool", "log"):
        (tmp / sub).mkdir()
    for name in DATA_FILES:
        shutil.copy(DATA / name, tmp / name)
    conf = tmp / "exim.conf"
    conf.write_text((DATA / "exim.conf").read_text().replace(PLACEHOLDER, f"{tmp}/"))
    return conf


def run(argv: list[str], stdin: bytes, timeout: float) -> tuple[float, list[str], str, int]:
    """Run one -be process; returns seconds, stdout lines, stderr tail, exit code."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, input=stdin, capture_output=True, timeout=timeout)
    elapsed = time.perf_counter() - t0
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the text ends with a newline, not an extra line
    return elapsed, lines, proc.stderr.decode("utf-8", "replace")[-2000:], proc.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=10_000)
    ap.add_argument("--exim", default="/usr/sbin/exim4")
    default_py = shutil.which("exim-py") or str(Path(sys.executable).parent / "exim-py")
    ap.add_argument("--exim-py", default=default_py)
    ap.add_argument("--show", type=int, default=10, help="differing lines to print")
    ap.add_argument("--timeout", type=float, default=600.0, help="per process, seconds")
    ap.add_argument("--dump", help="write the generated strings to this file")
    ap.add_argument("--repeat", type=int, default=1, help="runs each; best time is reported")
    args = ap.parse_args()

    if not (os.path.isfile(args.exim) and os.access(args.exim, os.X_OK)):
        print(f"exim4 not found or not executable: {args.exim}", file=sys.stderr)
        return 2
    if not (os.path.isfile(args.exim_py) and os.access(args.exim_py, os.X_OK)):
        print(f"exim-py not found or not executable: {args.exim_py}", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="expand-bench-") as tmpname:
        tmp = Path(tmpname)
        conf = prepare(tmp)
        strings = make_strings(args.count, str(tmp))
        if args.dump:
            Path(args.dump).write_text("".join(s + "\n" for s in strings))
        stdin = "".join(s + "\n" for s in strings).encode()
        results: dict[str, tuple[float, list[str], str, int]] = {}
        times: dict[str, list[float]] = {"exim4": [], "exim-py": []}
        # Alternate the two so that machine-load drift hits both alike.
        for _ in range(max(1, args.repeat)):
            for name, prog in (("exim4", args.exim), ("exim-py", args.exim_py)):
                try:
                    res = run([prog, "-C", str(conf), "-be"], stdin, args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"{name} timed out after {args.timeout:.0f}s", file=sys.stderr)
                    return 1
                times[name].append(res[0])
                if name not in results or res[0] < results[name][0]:
                    results[name] = res

    t_ex, out_ex, err_ex, rc_ex = results["exim4"]
    t_py, out_py, err_py, rc_py = results["exim-py"]
    # Each input gives one "> result" line, so index i maps to strings[i].
    ndiff = 0
    shown = 0
    for i in range(max(len(out_ex), len(out_py))):
        a = out_ex[i] if i < len(out_ex) else "<missing>"
        b = out_py[i] if i < len(out_py) else "<missing>"
        if a == b:
            continue
        ndiff += 1
        if shown < args.show:
            shown += 1
            src = strings[i] if i < len(strings) else "<past end of input>"
            print(f"line {i + 1}: {src}\n  exim4:   {a}\n  exim-py: {b}")
    if len(out_ex) != len(out_py):
        print(f"output line counts differ: exim4 {len(out_ex)}, exim-py {len(out_py)}")
    # A non-zero exit or stderr text usually means a process died part way
    # (exim4 does so on a config error met while expanding), so show it.
    for name, err, rc in (("exim4", err_ex, rc_ex), ("exim-py", err_py, rc_py)):
        if rc:
            print(f"{name} exit status: {rc}")
        if err.strip():
            print(f"{name} stderr (last line): {err.strip().splitlines()[-1]}")

    n = len(strings)
    print(f"strings:        {n} ({len(TEMPLATES)} templates, seed {SEED})")
    if args.repeat > 1:
        print(f"timing:         best of {args.repeat} runs each")
    print(f"exim4:          {t_ex:8.3f} s  {n / t_ex:10.0f} strings/s")
    print(f"exim-py:        {t_py:8.3f} s  {n / t_py:10.0f} strings/s")
    print(f"ratio py/exim4: {t_py / t_ex:8.1f}")
    if args.repeat > 1:
        for name, ts in times.items():
            print(f"{name} runs: " + " ".join(f"{t:.3f}" for t in ts))
    print(f"differing lines: {ndiff} of {max(len(out_ex), len(out_py))} output lines")
    return 0


if __name__ == "__main__":
    sys.exit(main())
