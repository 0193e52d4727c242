"""`python cli.py run ...` from a checkout, without installing the console script."""

from raygrad.cli import main

if __name__ == "__main__":
    main()
