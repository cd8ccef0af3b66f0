"""The suite's small generated world: its size, shared by conftest's fixtures and the tests that
generate the same world themselves (import it from here: several directories have a conftest)."""

SMALL_WORLD = dict(
    n_people=80, n_cities=20, n_countries=5, n_organizations=15, n_works=20,
    n_famous_people=2, n_famous_cities=1,
)  # fmt: skip
