import sys

try:
    from qcore.cli import main
except KeyboardInterrupt:  # Ctrl-C while torch is still importing: same one line as later
    print("qcore: interrupted; nothing was written", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
