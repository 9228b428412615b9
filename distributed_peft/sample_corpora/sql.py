"""Template-generated text-to-SQL questions over small CREATE TABLE contexts, plus seeded sqlite databases for them."""

from __future__ import annotations

import math
import random
import re
import sqlite3
from dataclasses import dataclass

TARGET_PAIRS = 2500


@dataclass(frozen=True)
class Column:
    """One column: its SQL type, its role in the templates and its English phrase."""

    name: str
    sql_type: str
    role: str  # "id", "key" (foreign key), "label", "category", "number"
    phrase: str = ""

    @property
    def words(self) -> str:
        """English phrase for the column."""
        return self.phrase or self.name.replace("_", " ")


@dataclass(frozen=True)
class Table:
    """One table with the English nouns used to talk about its rows."""

    name: str
    singular: str
    plural: str
    label_verb: str  # how a row is referred to by its label: "named" or "titled"
    columns: tuple[Column, ...]

    def with_role(self, role: str) -> list[Column]:
        """Columns of the given role."""
        return [column for column in self.columns if column.role == role]

    @property
    def label(self) -> Column:
        """The column that names a row: its label column, else its id."""
        return (self.with_role("label") or self.with_role("id"))[0]

    @property
    def create_statement(self) -> str:
        """CREATE TABLE statement in the sql-create-context style."""
        columns = ", ".join(f"{column.name} {column.sql_type}" for column in self.columns)
        return f"CREATE TABLE {self.name} ({columns})"


@dataclass(frozen=True)
class Schema:
    """One or two tables; with two, the second references the first through its key column."""

    name: str
    tables: tuple[Table, ...]

    @property
    def context(self) -> str:
        """CREATE TABLE statements separated by '; '."""
        return "; ".join(table.create_statement for table in self.tables)


def text_col(name: str, role: str, phrase: str = "") -> Column:
    """A TEXT column."""
    return Column(name, "TEXT", role, phrase)


def int_col(name: str, role: str = "number", phrase: str = "") -> Column:
    """An INTEGER column."""
    return Column(name, "INTEGER", role, phrase)


def real_col(name: str, phrase: str = "") -> Column:
    """A REAL number column."""
    return Column(name, "REAL", "number", phrase)


ID = int_col("id", "id")
# fmt: off
SCHEMAS: tuple[Schema, ...] = (
    Schema("company", (
        Table("employees", "employee", "employees", "named", (
            ID, text_col("name", "label"), text_col("department", "category"), text_col("city", "category"),
            real_col("salary"), int_col("age"))),
    )),
    Schema("shop", (
        Table("products", "product", "products", "named", (
            ID, text_col("name", "label"), text_col("category", "category"), real_col("price"),
            int_col("stock", phrase="stock level"))),
        Table("orders", "order", "orders", "with id", (
            ID, int_col("product_id", "key"), text_col("customer", "category"), int_col("quantity"),
            text_col("status", "category", "order status"))),
    )),
    Schema("school", (
        Table("students", "student", "students", "named", (
            ID, text_col("name", "label"), text_col("major", "category"), int_col("year", phrase="study year"),
            real_col("gpa", "GPA"))),
        Table("enrollments", "enrollment", "enrollments", "with id", (
            ID, int_col("student_id", "key"), text_col("course", "category"), int_col("grade"),
            text_col("semester", "category"))),
    )),
    Schema("travel", (
        Table("flights", "flight", "flights", "numbered", (
            ID, text_col("flight_number", "label"), text_col("airline", "category"),
            text_col("origin", "category", "origin city"), text_col("destination", "category", "destination city"),
            int_col("distance", phrase="distance in miles"), real_col("price", "ticket price"))),
    )),
    Schema("library", (
        Table("authors", "author", "authors", "named", (
            ID, text_col("name", "label"), text_col("country", "category"),
            int_col("birth_year", phrase="birth year"))),
        Table("books", "book", "books", "titled", (
            ID, text_col("title", "label"), int_col("author_id", "key"), text_col("genre", "category"),
            int_col("pages", phrase="page count"), int_col("published_year", phrase="publication year"),
            real_col("rating"))),
    )),
    Schema("cinema", (
        Table("movies", "movie", "movies", "titled", (
            ID, text_col("title", "label"), text_col("director", "category"), text_col("genre", "category"),
            int_col("release_year", phrase="release year"), real_col("rating"),
            real_col("box_office", "box office revenue"))),
    )),
    Schema("league", (
        Table("players", "player", "players", "named", (
            ID, text_col("name", "label"), text_col("team", "category"), text_col("position", "category"),
            int_col("goals", phrase="goal count"), int_col("age"))),
    )),
)
# fmt: on


def pool(values: str) -> tuple[str, ...]:
    """A value pool written as one '|'-separated string."""
    return tuple(values.split("|"))


PEOPLE = pool("Alice|Bob|Carol|David|Emma|Frank|Grace|Henry|Irene|Jack|Karen|Liam|Maria|Noah|Olivia|Peter|Quinn|Rosa")
TEXT_POOLS: dict[str, tuple[str, ...]] = {
    "name": PEOPLE,
    "customer": PEOPLE[:12],
    "city": pool("London|Paris|Berlin|Madrid|Rome|Tokyo|Toronto|Sydney"),
    "department": pool("Sales|Marketing|Engineering|Finance|Support|Legal"),
    "products.name": pool("Laptop|Phone|Tablet|Monitor|Keyboard|Mouse|Headphones|Camera|Printer|Speaker|Router|Webcam"),
    "products.category": pool("Electronics|Office|Audio|Accessories|Photography"),
    "status": pool("shipped|pending|delivered|cancelled"),
    "major": pool("Biology|History|Physics|Mathematics|Economics|Computer Science|Art"),
    "course": pool("Algebra|Chemistry|World History|Databases|Statistics|Poetry|Microeconomics"),
    "semester": pool("Fall 2022|Spring 2023|Fall 2023|Spring 2024"),
    "flight_number": pool("AA101|AA202|AA303|BA117|BA245|LH400|LH455|AF22|AF81|DL9|DL310|EK7|EK203|UA88|UA901"),
    "airline": pool("American Airlines|British Airways|Lufthansa|Air France|Delta|Emirates"),
    "origin": pool("New York|London|Paris|Frankfurt|Dubai|Chicago|Boston"),
    "destination": pool("Tokyo|Rome|Madrid|Toronto|Sydney|Lisbon|Chicago"),
    "country": pool("USA|UK|France|Germany|Japan|Brazil|Canada|Nigeria"),
    "authors.name": pool(
        "Ada Stone|Ben Rivers|Clara Moss|Dev Patel|Elena Cruz|Felix Young|Hana Sato|Ivan Petrov|June Park|Kofi Mensah"
    ),
    "title": pool(
        "The Silent Sea|Midnight Garden|Iron Crown|Paper Moon|The Last Orbit|Winter Road|Glass City|Hidden Stars|"
        "Red River|The Long Game|Blue Horizon|Quiet Storm|Golden Hour|Night Train|Lost Signal|Open Water"
    ),
    "genre": pool("Drama|Comedy|Thriller|Science Fiction|Fantasy|Mystery|Romance"),
    "director": pool("Ava Lane|Omar Diaz|Greta Holm|Ken Mori|Sofia Reyes|Paul Grant"),
    "team": pool("Lions|Eagles|Sharks|Wolves|Tigers|Hawks"),
    "position": pool("Goalkeeper|Defender|Midfielder|Forward"),
}
NUMBER_RANGES: dict[str, tuple[float, float]] = {
    "salary": (30000, 150000),
    "age": (18, 65),
    "price": (5, 1500),
    "flights.price": (80, 1800),
    "stock": (0, 500),
    "quantity": (1, 20),
    "year": (1, 4),
    "gpa": (2.0, 4.0),
    "grade": (50, 100),
    "distance": (200, 9000),
    "birth_year": (1930, 1995),
    "pages": (90, 900),
    "published_year": (1950, 2023),
    "rating": (1.0, 10.0),
    "release_year": (1970, 2023),
    "box_office": (1.0, 900.0),
    "goals": (0, 40),
    "players.age": (17, 38),
}

CREATE_TABLE_PATTERN = re.compile(r"CREATE TABLE\s+(\w+)\s*\(([^)]*)\)", re.IGNORECASE)


def lookup(pools: dict, table: str, column: str) -> object | None:
    """Pool for a column, preferring the table-qualified entry."""
    return pools.get(f"{table}.{column}", pools.get(column))


def format_number(value: float) -> str:
    """Render a number without a trailing .0."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def draw_threshold(rng: random.Random, table: Table, column: Column) -> float:
    """A round number well inside the column's value range, so comparisons split the rows."""
    low, high = lookup(NUMBER_RANGES, table.name, column.name)
    span = high - low
    step = max(1.0 if column.sql_type == "INTEGER" else 0.1, 10 ** math.floor(math.log10(span)) / 10)
    value = rng.uniform(low + 0.2 * span, high - 0.2 * span)
    return round(round(value / step) * step, 1)


def draw_text(rng: random.Random, table: Table, column: Column) -> str:
    """A value from the column's text pool."""
    return rng.choice(lookup(TEXT_POOLS, table.name, column.name))


def plural(words: str) -> str:
    """English plural of a column phrase."""
    if words.endswith(("s", "x")):
        return words + "es"
    if words.endswith("y") and words[-2] not in "aeiou":
        return words[:-1] + "ies"
    return words + "s"


def article(words: str) -> str:
    """Indefinite article for a phrase."""
    return "an" if words[0].lower() in "aeiou" else "a"


def quote(value: str) -> str:
    """SQL string literal."""
    return "'" + value.replace("'", "''") + "'"


AGGREGATES = (("average", "AVG"), ("maximum", "MAX"), ("minimum", "MIN"), ("total", "SUM"))
NON_ADDITIVE = frozenset({"age", "year", "birth_year", "published_year", "release_year", "gpa", "rating", "grade"})
COMPARISONS = (("greater than", ">"), ("less than", "<"), ("above", ">"), ("below", "<"))


def single_table_question(rng: random.Random, table: Table) -> tuple[str, str]:
    """One question and its SQL over a single table."""
    label, categories, numbers = table.label, table.with_role("category"), table.with_role("number")
    category, number, other = rng.choice(categories), rng.choice(numbers), rng.choice(categories + numbers)
    value, threshold = draw_text(rng, table, category), format_number(draw_threshold(rng, table, number))
    rows, row, name, labels = table.plural, table.singular, table.name, plural(label.words)
    cat, cat_sql, num, num_sql, a_num = category.words, category.name, number.words, number.name, article(number.words)
    where_value = f"WHERE {cat_sql} = {quote(value)}"
    compare_word, compare = rng.choice(COMPARISONS)
    # Summing years or ages means nothing, so those columns only get AVG/MAX/MIN.
    word, function = rng.choice(AGGREGATES if number.name not in NON_ADDITIVE else AGGREGATES[:3])
    kind = rng.randrange(15)
    if label.role == "id" and kind in (2, 13):
        kind = 4  # rows named only by their id: no lookup by name, no LIKE on the name
    if kind == 0:
        question = rng.choice(
            (
                f"What are the {labels} of {rows} whose {cat} is {value}?",
                f"List the {label.words} of every {row} with {cat} {value}.",
                f"Which {rows} have the {cat} {value}? Give their {labels}.",
            )
        )
        return question, f"SELECT {label.name} FROM {name} {where_value}"
    if kind == 1:
        question = f"Which {rows} have {a_num} {num} {compare_word} {threshold}? List their {labels}."
        return question, f"SELECT {label.name} FROM {name} WHERE {num_sql} {compare} {threshold}"
    if kind == 2:
        row_label = draw_text(rng, table, label)
        question = f"What is the {other.words} of the {row} {table.label_verb} {row_label}?"
        return question, f"SELECT {other.name} FROM {name} WHERE {label.name} = {quote(row_label)}"
    if kind == 3:
        question = rng.choice((f"How many {rows} are there?", f"Count the number of {rows}."))
        return question, f"SELECT COUNT(*) FROM {name}"
    if kind == 4:
        return f"How many {rows} have the {cat} {value}?", f"SELECT COUNT(*) FROM {name} {where_value}"
    if kind == 5:
        question = f"How many {rows} have {a_num} {num} {compare_word} {threshold}?"
        return question, f"SELECT COUNT(*) FROM {name} WHERE {num_sql} {compare} {threshold}"
    if kind == 6:
        return f"What is the {word} {num} of all {rows}?", f"SELECT {function}({num_sql}) FROM {name}"
    if kind == 7:
        question = f"What is the {word} {num} of {rows} whose {cat} is {value}?"
        return question, f"SELECT {function}({num_sql}) FROM {name} {where_value}"
    if kind == 8:
        limit = rng.randint(1, 5)
        extreme, order = rng.choice((("highest", "DESC"), ("lowest", "ASC")))
        question = (
            f"Which {row} has the {extreme} {num}?"
            if limit == 1
            else f"What are the {labels} of the {limit} {rows} with the {extreme} {num}?"
        )
        return question, f"SELECT {label.name} FROM {name} ORDER BY {num_sql} {order} LIMIT {limit}"
    if kind == 9:
        question = f"How many {rows} are there for each {cat}?"
        return question, f"SELECT {cat_sql}, COUNT(*) FROM {name} GROUP BY {cat_sql}"
    if kind == 10:
        question = f"What is the {word} {num} of {rows} for each {cat}?"
        return question, f"SELECT {cat_sql}, {function}({num_sql}) FROM {name} GROUP BY {cat_sql}"
    if kind == 11:
        question = rng.choice(
            (f"List the distinct {plural(cat)} of all {rows}.", f"What {plural(cat)} do {rows} have?")
        )
        return question, f"SELECT DISTINCT {cat_sql} FROM {name}"
    if kind == 12:
        other_bound = draw_threshold(rng, table, number)
        while format_number(other_bound) == threshold:
            other_bound = draw_threshold(rng, table, number)
        bounds = sorted((float(threshold), other_bound))
        low, high = (format_number(bound) for bound in bounds)
        question = f"Which {rows} have {a_num} {num} between {low} and {high}? Give their {labels}."
        return question, f"SELECT {label.name} FROM {name} WHERE {num_sql} BETWEEN {low} AND {high}"
    if kind == 13:
        letter = draw_text(rng, table, label)[0]
        question = f"Which {rows} have {article(label.words)} {label.words} starting with the letter {letter}?"
        return question, f"SELECT {label.name} FROM {name} WHERE {label.name} LIKE '{letter}%'"
    question = f"List the {labels} of {rows} with {cat} {value} and {a_num} {num} {compare_word} {threshold}."
    return question, f"SELECT {label.name} FROM {name} {where_value} AND {num_sql} {compare} {threshold}"


def join_question(rng: random.Random, parent: Table, child: Table) -> tuple[str, str]:
    """One question and its SQL joining a child table to the parent it references."""
    key = child.with_role("key")[0]
    join = f"FROM {parent.name} AS T1 JOIN {child.name} AS T2 ON T1.id = T2.{key.name}"
    label, labels = parent.label, plural(parent.label.words)
    category, number = rng.choice(child.with_role("category")), rng.choice(child.with_role("number"))
    parent_other = rng.choice(parent.with_role("category") + parent.with_role("number"))
    kind = rng.randrange(4)
    if kind == 0:
        value = draw_text(rng, child, category)
        question = f"Which {parent.plural} have {child.plural} with {category.words} {value}? List their {labels}."
        return question, f"SELECT DISTINCT T1.{label.name} {join} WHERE T2.{category.name} = {quote(value)}"
    if kind == 1:
        row_label = draw_text(rng, parent, label)
        owner = f"the {parent.singular} {parent.label_verb} {row_label}"
        question = f"List the {category.words} of all {child.plural} of {owner}."
        return question, f"SELECT T2.{category.name} {join} WHERE T1.{label.name} = {quote(row_label)}"
    if kind == 2:
        question = f"How many {child.plural} does each {parent.singular} have? Show the {label.words} and the count."
        return question, f"SELECT T1.{label.name}, COUNT(*) {join} GROUP BY T1.{label.name}"
    threshold = format_number(draw_threshold(rng, child, number))
    with_number = f"{child.plural} with {article(number.words)} {number.words} above {threshold}"
    question = f"What is the {parent_other.words} of {parent.plural} that have {with_number}?"
    return question, f"SELECT DISTINCT T1.{parent_other.name} {join} WHERE T2.{number.name} > {threshold}"


def generate(seed: int) -> list[dict]:
    """Return seeded, unique question/context/answer records over SCHEMAS."""
    rng = random.Random(seed)
    records: list[dict] = []
    seen: set[tuple[str, str]] = set()
    attempts = 0
    while len(records) < TARGET_PAIRS and attempts < TARGET_PAIRS * 50:
        attempts += 1
        schema = rng.choice(SCHEMAS)
        if len(schema.tables) == 2 and rng.random() < 0.3:
            question, answer = join_question(rng, *schema.tables)
        else:
            question, answer = single_table_question(rng, rng.choice(schema.tables))
        if (question, answer) in seen:
            continue
        seen.add((question, answer))
        records.append({"question": question, "context": schema.context, "answer": answer})
    return records


def random_cell(rng: random.Random, table: str, column: str, sql_type: str, row_id: int, rows: int) -> object:
    """A seeded cell value drawn from the same pools the questions use."""
    if column == "id":
        return row_id
    if column.endswith("_id"):
        return rng.randint(1, rows)
    text_pool = lookup(TEXT_POOLS, table, column)
    if text_pool is not None:
        return rng.choice(text_pool)
    number_range = lookup(NUMBER_RANGES, table, column)
    low, high = number_range if number_range is not None else (0, 100)
    if sql_type.upper() == "INTEGER":
        return rng.randint(int(low), int(high))
    if sql_type.upper() == "REAL":
        return round(rng.uniform(low, high), 2)
    return f"{column}_{rng.randint(1, rows)}"


def create_database(context: str, seed: int = 0, rows: int = 20) -> sqlite3.Connection:
    """In-memory sqlite database with the tables of `context`, filled with seeded rows."""
    rng = random.Random(seed)
    connection = sqlite3.connect(":memory:")
    for match in CREATE_TABLE_PATTERN.finditer(context):
        table, column_text = match.group(1), match.group(2)
        columns = [part.split() for part in column_text.split(",") if part.strip()]
        connection.execute(match.group(0))
        placeholders = ", ".join("?" for _ in columns)
        for row_id in range(1, rows + 1):
            values = [random_cell(rng, table, name, (rest or ["TEXT"])[0], row_id, rows) for name, *rest in columns]
            connection.execute(f"INSERT INTO {table} VALUES ({placeholders})", values)
    connection.commit()
    return connection
