"""`export-web DIR`: the in-browser screener as a static site (index.html and what it loads), for any
static host; the X-ray is screened in the reader's browser and never sent anywhere (docs/browser.md)."""

from __future__ import annotations

from pneumonia.cli import fail
from pneumonia.cli.options import add_model_option


def run(args) -> int:
    from pneumonia.errors import ModelLoadError
    from pneumonia.web.device_site import build_site, write_site

    try:
        site = build_site(args.model, server_url=args.server_url)
    except ModelLoadError as err:
        return fail(err)
    written = write_site(site, args.out)
    size = sum(path.stat().st_size for path in written)
    print(f"{len(written)} files, {size / 1e6:.1f} MB, in {args.out}: serve the folder as it is, over http(s)")
    print("(a browser opening index.html as a file:// page refuses to fetch the model)")
    return 0


def add(commands, shipped: str) -> None:
    export = commands.add_parser(
        "export-web", help="write the in-browser screener as a static site (the X-ray never leaves the browser)"
    )
    export.add_argument("out", help="folder to write the site into (created; files already there are replaced)")
    add_model_option(export, shipped)
    export.add_argument(
        "--server-url", default=None, help="the server mode's address, linked for browsers that cannot screen"
    )
    export.set_defaults(run=run)
