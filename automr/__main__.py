"""`python -m automr ...`: the same command as `automr ...`."""

from automr.cli import main

if __name__ == "__main__":
    main()
