"""``python -m altgrad_jax``: print the table of registered formats."""

from altgrad_jax.formats import format_table


def main() -> None:
    print(format_table())


if __name__ == "__main__":
    main()
