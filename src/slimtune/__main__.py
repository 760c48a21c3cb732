"""`python -m slimtune` (and `torchrun ... -m slimtune train CONFIG`) runs the CLI."""

from slimtune.cli import main

if __name__ == "__main__":
    main()
