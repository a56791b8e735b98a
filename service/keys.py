"""API key helper: ``python -m service.keys new CLIENT`` prints a token and its configuration line."""

from __future__ import annotations

import argparse
import sys

from service.auth import hash_token, new_token


def main(argv: list[str] | None = None) -> None:
    """Create a token for a client, or hash an existing one."""
    parser = argparse.ArgumentParser(prog="python -m service.keys", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser("new", help="create a token for CLIENT")
    new.add_argument("client")
    hashed = sub.add_parser("hash", help="print the sha256 of a token read from stdin")
    hashed.add_argument("client")
    args = parser.parse_args(argv)
    if args.command == "new":
        token = new_token()
        print(f"token (give to the client, not stored): {token}")
    else:
        token = sys.stdin.readline().strip()
    print(f"TTASEG_API_KEYS entry:  {args.client}:{hash_token(token)}")
    print(f"TTASEG_API_KEYS_FILE line:  {args.client} {hash_token(token)}")


if __name__ == "__main__":
    main()
