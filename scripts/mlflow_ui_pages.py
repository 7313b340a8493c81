"""Open a pipeline run's pages in MLflow's UI with headless Chromium: save each page's rendered DOM and a
screenshot. The browser test reads the DOMs; the README's screenshots in docs/img/ come from here.

    python scripts/mlflow_ui_pages.py --out DIR [--tracking-uri URI] [--reports DIR] [--width 1600]

The pages are the links the run printed (reports/<run>/links.json: runs table, compare page, champion
version) plus the experiment's Models tab and a variant run's bit-map image. A local store (sqlite:) is
served by `mlflow server` on a free loopback port for the duration; a tracking server is used as is.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tasks.registry.ui import LOCAL_UI, WORKFLOW_QUERY  # noqa: E402
from tests.services import CHROMIUM, chromium, free_port, stop_group, tool, wait_http  # noqa: E402


def pages(links: dict, base: str) -> dict[str, str]:
    """name -> URL on `base`: the run's links, its experiment's Models tab, the first variant's bit map."""
    rebased = {k: v.replace(LOCAL_UI, base, 1) for k, v in links.items()}
    experiment = rebased["runs"].split("/#/experiments/", 1)[1].split("/", 1)[0]
    out = {k: rebased[k] for k in ("runs", "compare", "champion") if k in rebased}
    out["models"] = f"{base}/#/experiments/{experiment}/models?{WORKFLOW_QUERY}"
    if links.get("bitmap_run"):
        out["bitmap"] = f"{base}/#/experiments/{experiment}/runs/{links['bitmap_run']}/artifacts/bitmap.png?{WORKFLOW_QUERY}"
    return out


def capture(urls: dict[str, str], out: Path, width: int = 2000, height: int = 1000) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        for name, url in urls.items():
            # The runs table renders only the columns in the window: the DOM is taken at the screenshot's size.
            dom = chromium(f"--window-size={width},{height}", "--dump-dom", url, profile=Path(profile) / name)
            if dom.returncode != 0:
                raise SystemExit(f"error: chromium could not open {url}: {dom.stderr.strip().splitlines()[-1:]}")
            (out / f"{name}.html").write_text(dom.stdout)
            png = out / f"{name}.png"
            chromium(f"--window-size={width},{height}", f"--screenshot={png}", url, profile=Path(profile) / f"{name}-shot")
            written += [out / f"{name}.html", png]
            print(f"{name}: {url}\n    {png}", flush=True)
    return written


def serve(tracking_uri: str, log: Path):
    """(base URL, process or None): `mlflow server` over a local store, or the tracking server itself."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/"), None
    port = free_port()
    proc = subprocess.Popen([tool("mlflow"), "server", "--backend-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/health", proc, log, 180)
    return base, proc


def main(argv=None) -> int:
    home = Path(os.environ.get("QUANT_HOME", REPO / ".state"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where the DOMs and screenshots go")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"))
    parser.add_argument("--reports", type=Path, default=home / "reports" / "latest", help="the run's report directory")
    parser.add_argument("--width", type=int, default=2000)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    if CHROMIUM is None:
        print("error: chromium is not installed (apt-get install -y chromium)", file=sys.stderr)
        return 2
    links_file = args.reports / "links.json"
    if not links_file.is_file():
        print(f"error: {links_file} not found: run the pipeline first (make run)", file=sys.stderr)
        return 2
    links = json.loads(links_file.read_text())
    results = json.loads((args.reports / "results.json").read_text())
    links["bitmap_run"] = next((r["run_id"] for r in results if r.get("champion")), None) or next(
        (r["run_id"] for r in results if r.get("backend") != "none"), None)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    base, proc = serve(args.tracking_uri, args.out / "mlflow-server.log")
    try:
        capture(pages(links, base), args.out, args.width, args.height)
    finally:
        if proc is not None:
            stop_group(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
