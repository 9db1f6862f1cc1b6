"""Make the README's picture of the app: the Activations page at W4A4 in the real chromium the browser
tests drive, against a fresh `streamlit run app.py` (started and stopped here, on 127.0.0.1).

    QCORE_DATA_DIR=../shared/data python docs/screenshot.py        # writes docs/images/app.png

Run it again after a change to the pages; the PNG is stored with 64 colours to stay small.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import IDLE, chromium, streamlit_server  # noqa: E402

PAGE = "activations?weight_bits=4&act_bits=4"  # a what-if link: the page and its settings
VIEWPORT = {"width": 1280, "height": 800}
COLOURS = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "app.png")
    args = parser.parse_args()
    from PIL import Image

    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = args.out.with_suffix(".raw.png")
    with streamlit_server("streamlit_screenshot.log") as base, chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{base}/{PAGE}")
        page.wait_for_timeout(300)
        page.wait_for_selector(IDLE, timeout=180_000)
        page.wait_for_selector("[data-testid='stPlotlyChart']", timeout=180_000)
        page.wait_for_timeout(1500)  # plotly draws after the script run ends
        page.screenshot(path=str(raw))
    with Image.open(raw) as shot:
        shot.convert("RGB").quantize(COLOURS).save(args.out, optimize=True)
    raw.unlink()
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
