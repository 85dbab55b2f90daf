"""``python -m adatoken_compile ...`` (and ``torchrun ... -m adatoken_compile ...``): the CLI."""

from adatoken_compile.cli import main

if __name__ == "__main__":
    main()
