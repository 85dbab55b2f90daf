"""``python -m adatoken_compile ...`` (and ``torchrun ... -m adatoken_compile ...``): the CLI."""

from adatoken_compile.cli import main

if __name__ == "__main__":
    main(prog_name="adatoken-compile")  # the command's name in messages, however it was started
