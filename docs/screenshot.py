"""Remake docs/images/result-page.png, the README's screenshot of the result page, for the shipped model:
`python docs/screenshot.py` (needs Debian's `chromium`). The page is rendered by the app's test client
for one of the test X-rays, its stylesheet inlined, and shot by headless Chromium."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "images" / "result-page.png"
XRAY = ROOT / "tests" / "data" / "pneumonia-person1005_bacteria_2936.jpeg"


def styled_result_page(client) -> str:
    """The result page for XRAY as the app's test `client` answers it, its stylesheets inlined."""
    with XRAY.open("rb") as xray:
        page = client.post("/predict", data={"file": (xray, "chest.jpeg")}, content_type="multipart/form-data")
    html, inlined = re.subn(
        r'<link[^>]+href="(/static/[^"?]+\.css)(\?[^"]*)?"[^>]*>',  # ?v=: the file's content hash
        lambda link: "<style>" + client.get(link.group(1)).get_data(as_text=True) + "</style>",
        page.get_data(as_text=True),
    )
    if not inlined:
        raise SystemExit("the result page links no stylesheet this script recognises: the shot would be unstyled")
    return html


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from pneumonia.web import create_app

    html = styled_result_page(create_app().test_client())
    with tempfile.TemporaryDirectory() as folder:
        source, shot = Path(folder) / "result.html", Path(folder) / "shot.png"
        source.write_text(html, encoding="utf-8")
        subprocess.run(
            ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1100,1800"]
            + [f"--screenshot={shot}", source.as_uri()],
            check=True,
            capture_output=True,
        )
        image = Image.open(shot).convert("RGB")
    OUT.parent.mkdir(exist_ok=True)
    small = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
    small.quantize(colors=256, dither=Image.Dither.FLOYDSTEINBERG).save(
        OUT, optimize=True
    )  # a palette PNG: a fifth of the size


if __name__ == "__main__":
    main()
