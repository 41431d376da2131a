"""paged_kv command line: `python -m paged_kv {demo,info}`."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"demo": "run the demo (the main job)", "info": "print the build, the GPU, cuFile and versions"}
    if not argv or argv[0] not in commands:
        print("usage: python -m paged_kv {demo,info} [options]")
        for name, text in commands.items():
            print(f"  {name:<6} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "info":
        from paged_kv import info

        if argv[1:]:
            print(f"python -m paged_kv info takes no options, got {' '.join(argv[1:])}", file=sys.stderr)
            return 2
        return info.main()
    from paged_kv import demo

    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
