"""Template-generated code instructions (Python, JavaScript, SQL, shell, C++) in a codegen instruction style."""

from __future__ import annotations

import random

TARGET_RECORDS = 1500
KEEP_OPTIONAL_INPUT_SHARE = 0.95
MAX_RESPONSE_CHARS = 400

ELEMENT_OPERATIONS = (
    ("squares", "x ** 2", "x * x", "squares"),
    ("cubes", "x ** 3", "x * x * x", "cubes"),
    ("absolute values", "abs(x)", "Math.abs(x)", "absolute_values"),
    ("doubled values", "2 * x", "2 * x", "doubled_values"),
    ("halves", "x / 2", "x / 2", "halves"),
)
COMPARISONS = (("greater than", ">"), ("less than", "<"), ("at least", ">="), ("at most", "<="))
UNIT_CONVERSIONS = (
    ("kilometers", "miles", 0.621371),
    ("miles", "kilometers", 1.609344),
    ("kilograms", "pounds", 2.204623),
    ("pounds", "kilograms", 0.453592),
    ("liters", "gallons", 0.264172),
    ("inches", "centimeters", 2.54),
    ("meters", "feet", 3.28084),
    ("hours", "minutes", 60),
)
PYTHON_STATISTICS = (
    ("largest", "largest", "max(numbers)"),
    ("smallest", "smallest", "min(numbers)"),
    ("average", "average", "sum(numbers) / len(numbers)"),
    ("range (largest minus smallest)", "range", "max(numbers) - min(numbers)"),
)
JS_REDUCTIONS = (
    ("sum", "sumArray", "arr.reduce((a, b) => a + b, 0)"),
    ("product", "productArray", "arr.reduce((a, b) => a * b, 1)"),
    ("maximum", "maxArray", "Math.max(...arr)"),
    ("minimum", "minArray", "Math.min(...arr)"),
)
CPP_REDUCTIONS = (
    ("sum", "sumVector", "std::accumulate(v.begin(), v.end(), 0)", "numeric"),
    ("maximum", "maxVector", "*std::max_element(v.begin(), v.end())", "algorithm"),
    ("minimum", "minVector", "*std::min_element(v.begin(), v.end())", "algorithm"),
)
CPP_SHAPES = (
    ("Rectangle", ("width", "height"), "width * height"),
    ("Circle", ("radius",), "3.14159 * radius * radius"),
    ("Square", ("side",), "side * side"),
    ("Triangle", ("base", "height"), "0.5 * base * height"),
)
CLASS_SPECS = (
    ("Car", ("make", "model", "year")),
    ("Book", ("title", "author", "pages")),
    ("Student", ("name", "grade", "school")),
    ("Employee", ("name", "position", "salary")),
    ("Product", ("name", "price", "stock")),
    ("Movie", ("title", "director", "rating")),
    ("Account", ("owner", "balance", "currency")),
    ("City", ("name", "country", "population")),
)
SQL_TABLES = (
    ("employees", "salary", "department", "name"),
    ("products", "price", "category", "name"),
    ("orders", "total", "customer_id", "id"),
    ("students", "gpa", "major", "name"),
    ("books", "pages", "genre", "title"),
    ("movies", "rating", "genre", "title"),
    ("flights", "distance", "airline", "flight_number"),
)
WORDS = (
    "apple",
    "banana",
    "cherry",
    "data",
    "river",
    "mountain",
    "code",
    "python",
    "level",
    "radar",
    "orange",
    "stone",
)
SENTENCES = (
    "the quick brown fox jumps over the lazy dog",
    "hello world from the command line",
    "practice makes perfect",
    "code is read more often than it is written",
    "simple is better than complex",
    "a journey of a thousand miles begins with a single step",
    "keep calm and write tests",
)
FILE_EXTENSIONS = ("py", "js", "txt", "log", "csv", "md", "cpp", "json")
DIRECTORIES = ("/var/log", "~/projects", "./src", "/tmp/data", "~/Documents", "./build", "/srv/www")
URLS = (
    "https://api.example.com/users",
    "https://api.example.com/posts",
    "https://example.org/data.json",
    "https://api.example.com/weather?city=Paris",
    "https://example.net/api/items",
)
ELEMENT_IDS = ("submit", "save-button", "menu-toggle", "login", "next", "reset", "download")
ALERT_MESSAGES = ("Saved!", "Hello!", "Form submitted", "Loading...", "Thanks for clicking")
CSV_FILES = ("data.csv", "sales.csv", "users.csv", "scores.csv", "report.csv")
CSV_COLUMNS = ("name", "email", "total", "score", "city", "date")
TEXT_FILES = ("words.txt", "book.txt", "notes.md", "access.log", "README.md")
OBJECT_PROPERTIES = ("age", "price", "score", "stock", "rating")

# Each template is (instruction, input, response, input is optional); all three are str.format templates over
# the slots from draw_slots. An optional input is an example that is dropped for part of the records.
TEMPLATES: tuple[tuple[str, str, str, bool], ...] = (
    (
        "Write a Python function that returns the sum of the {op_label} of a list.",
        "{numbers}",
        "def sum_of_{op_suffix}(numbers):\n    return sum({op_python} for x in numbers)",
        True,
    ),
    (
        "Write a Python function that returns the numbers in a list that are {cmp_word} {threshold}.",
        "{numbers}",
        "def filter_{cmp_name}_{threshold}(numbers):\n    return [x for x in numbers if x {cmp_op} {threshold}]",
        True,
    ),
    (
        "Create a Python function that counts how many times the letter '{char}' appears in a string.",
        '"{sentence}"',
        "def count_{char}(text):\n    return text.count('{char}')",
        True,
    ),
    (
        "Write a Python function that returns the first {count} Fibonacci numbers.",
        "",
        "def first_{count}_fibonacci():\n    numbers = [0, 1]\n    while len(numbers) < {count}:\n"
        "        numbers.append(numbers[-1] + numbers[-2])\n    return numbers",
        False,
    ),
    (
        "Implement a Python function that converts {unit_from} to {unit_to}.",
        "{amount}",
        "def {unit_from}_to_{unit_to}({unit_from}):\n    return {unit_from} * {unit_factor}",
        True,
    ),
    (
        "Create a Python class {class_name} with attributes {class_attributes} and a describe method.",
        "",
        "{class_code}",
        False,
    ),
    (
        "Write a Python function that returns the {stat_label} value in a list.",
        "{numbers}",
        "def {stat_name}_value(numbers):\n    return {stat_body}",
        True,
    ),
    (
        "Use a Python list comprehension to list all numbers from 1 to {limit} divisible by {divisor}.",
        "",
        "multiples = [n for n in range(1, {limit_plus_one}) if n % {divisor} == 0]\nprint(multiples)",
        False,
    ),
    (
        "Write a Python function that returns the {top} most common words in a text.",
        '"{sentence}"',
        "from collections import Counter\n\ndef top_{top}_words(text):\n"
        "    return Counter(text.lower().split()).most_common({top})",
        True,
    ),
    (
        "Write a Python function that checks whether a string is a palindrome.",
        '"{word}"',
        "def is_palindrome(text):\n    cleaned = text.lower().replace(' ', '')\n    return cleaned == cleaned[::-1]",
        True,
    ),
    (
        "Write a Python script that prints the '{csv_column}' column of the CSV file {csv_file}.",
        "",
        "import csv\n\nwith open('{csv_file}', newline='') as f:\n"
        "    for row in csv.DictReader(f):\n        print(row['{csv_column}'])",
        False,
    ),
    (
        "Write a Python function that removes duplicates from a list while keeping order.",
        "{numbers_with_repeats}",
        "def remove_duplicates(items):\n    return list(dict.fromkeys(items))",
        True,
    ),
    (
        "Fix the following Python code so it prints the numbers 1 to {count}.",
        "for i in range(1, {count}):\n    print(i)",
        "for i in range(1, {count_plus_one}):\n    print(i)",
        False,
    ),
    (
        "Write a JavaScript function that returns the {js_label} of an array of numbers.",
        "{numbers}",
        "function {js_name}(arr) {{\n  return {js_body};\n}}",
        True,
    ),
    (
        "Write a JavaScript arrow function that maps an array to its {op_label}.",
        "{numbers}",
        "const to{op_camel} = (arr) => arr.map((x) => {op_js});",
        True,
    ),
    (
        "Write a JavaScript function that keeps the objects whose {prop} is greater than {threshold}.",
        "[{{ {prop}: {threshold_minus_one} }}, {{ {prop}: {threshold_plus_five} }}]",
        "function filterBy{prop_title}(items) {{\n  return items.filter((item) => item.{prop} > {threshold});\n}}",
        True,
    ),
    (
        "Write JavaScript code that fetches JSON from {url} and logs it.",
        "",
        "fetch('{url}')\n  .then((response) => response.json())\n  .then((data) => console.log(data))\n"
        "  .catch((error) => console.error(error));",
        False,
    ),
    (
        "Create a JavaScript function that capitalizes the first letter of every word in a string.",
        '"{sentence}"',
        "function capitalizeWords(text) {{\n  return text.split(' ')\n"
        "    .map((w) => w.charAt(0).toUpperCase() + w.slice(1))\n    .join(' ');\n}}",
        True,
    ),
    (
        "Write JavaScript that shows an alert saying '{message}' when the button with id '{element_id}' is clicked.",
        "",
        "document.getElementById('{element_id}').addEventListener('click', () => {{\n  alert('{message}');\n}});",
        False,
    ),
    (
        "Write a JavaScript function that converts {unit_from} to {unit_to}.",
        "{amount}",
        "function {unit_from}To{unit_to_title}(value) {{\n  return value * {unit_factor};\n}}",
        True,
    ),
    (
        "Write a JavaScript function that counts the vowels in a string.",
        '"{sentence}"',
        "function countVowels(text) {{\n  return (text.match(/[aeiou]/gi) || []).length;\n}}",
        True,
    ),
    (
        "Write an SQL query that selects the {sql_label} of {sql_table} with {sql_number} above {sql_threshold}.",
        "",
        "SELECT {sql_label} FROM {sql_table} WHERE {sql_number} > {sql_threshold};",
        False,
    ),
    (
        "Write an SQL query that counts the rows of the {sql_table} table for each {sql_group}.",
        "",
        "SELECT {sql_group}, COUNT(*) AS total FROM {sql_table} GROUP BY {sql_group};",
        False,
    ),
    (
        "Write an SQL query to get the {top_limit} {sql_table} with the highest {sql_number}.",
        "",
        "SELECT {sql_label}, {sql_number} FROM {sql_table} ORDER BY {sql_number} DESC LIMIT {top_limit};",
        False,
    ),
    (
        "Write an SQL query returning the average {sql_number} per {sql_group} for groups of at least {top} rows.",
        "",
        "SELECT {sql_group}, AVG({sql_number}) FROM {sql_table} GROUP BY {sql_group} HAVING COUNT(*) >= {top};",
        False,
    ),
    (
        "Write an SQL statement that sets the {sql_number} of the {sql_table} row with id {row_id} to {amount}.",
        "",
        "UPDATE {sql_table} SET {sql_number} = {amount} WHERE id = {row_id};",
        False,
    ),
    (
        "Write an SQL statement that creates a table {class_table} with the columns {class_attributes}.",
        "",
        "CREATE TABLE {class_table} (id INTEGER PRIMARY KEY, {class_columns});",
        False,
    ),
    (
        "Write a shell command that counts the lines in all .{ext} files under {directory}.",
        "",
        "find {directory} -name '*.{ext}' -type f -exec cat {{}} + | wc -l",
        False,
    ),
    (
        "Write a shell command that lists files larger than {size_mb} MB in {directory}.",
        "",
        "find {directory} -type f -size +{size_mb}M -exec ls -lh {{}} \\;",
        False,
    ),
    (
        "Write a bash script that backs up {directory} into a tar.gz archive named with today's date.",
        "",
        '#!/bin/bash\ntar -czf "{backup_name}_$(date +%Y-%m-%d).tar.gz" {directory}',
        False,
    ),
    (
        "Write a bash loop that renames every .{ext} file in the current directory to .{other_ext}.",
        "",
        'for f in *.{ext}; do\n  mv "$f" "${{f%.{ext}}}.{other_ext}"\ndone',
        False,
    ),
    (
        "Write a shell pipeline that prints the {top_limit} most common words in {text_file}.",
        "",
        "tr -s '[:space:]' '\\n' < {text_file} | sort | uniq -c | sort -rn | head -n {top_limit}",
        False,
    ),
    (
        "Write a C++ function that returns the {cpp_label} of a vector of integers.",
        "{cpp_numbers}",
        "#include <vector>\n#include <{cpp_header}>\n\nint {cpp_name}(const std::vector<int>& v) {{\n"
        "    return {cpp_body};\n}}",
        True,
    ),
    (
        "Write a C++ program printing 1 to {limit}, Fizz for multiples of {fizz}, Buzz for {buzz}.",
        "",
        "#include <iostream>\n\nint main() {{\n    for (int i = 1; i <= {limit}; ++i) {{\n"
        '        if (i % {fizz_buzz} == 0) std::cout << "FizzBuzz\\n";\n'
        '        else if (i % {fizz} == 0) std::cout << "Fizz\\n";\n'
        '        else if (i % {buzz} == 0) std::cout << "Buzz\\n";\n'
        "        else std::cout << i << '\\n';\n    }}\n}}",
        False,
    ),
    ("Write a C++ class {shape} with a constructor and an area method.", "", "{shape_code}", False),
    (
        "Write a C++ function that reverses a string.",
        '"{word}"',
        "#include <algorithm>\n#include <string>\n\nstd::string reverseString(std::string s) {{\n"
        "    std::reverse(s.begin(), s.end());\n    return s;\n}}",
        True,
    ),
    (
        "Translate the following Python function into JavaScript.",
        "def sum_of_{op_suffix}(numbers):\n    return sum({op_python} for x in numbers)",
        "function sumOf{op_camel}(numbers) {{\n  return numbers.reduce((total, x) => total + {op_js}, 0);\n}}",
        False,
    ),
)


def random_numbers(rng: random.Random, low: int = -9, high: int = 20) -> list[int]:
    """Return a short random list of integers."""
    return [rng.randint(low, high) for _ in range(rng.randint(3, 6))]


def python_class_code(class_name: str, attributes: tuple[str, ...]) -> str:
    """Return a small Python class with an __init__ and a describe method."""
    assignments = "\n".join(f"        self.{attribute} = {attribute}" for attribute in attributes)
    description = ", ".join(f"{attribute}={{self.{attribute}}}" for attribute in attributes)
    return (
        f"class {class_name}:\n    def __init__(self, {', '.join(attributes)}):\n{assignments}\n\n"
        f"    def describe(self):\n        return f'{class_name}({description})'"
    )


def cpp_shape_code(shape: str, members: tuple[str, ...], area: str) -> str:
    """Return a C++ shape class with a constructor and an area method."""
    params = ", ".join(f"double {member}" for member in members)
    initialisers = ", ".join(f"{member}({member})" for member in members)
    fields = " ".join(f"double {member};" for member in members)
    return (
        f"class {shape} {{\npublic:\n    {shape}({params}) : {initialisers} {{}}\n"
        f"    double area() const {{ return {area}; }}\nprivate:\n    {fields}\n}};"
    )


# Slot names filled together from one drawn row of a pool, and single slots drawn from a pool.
SLOT_GROUPS = {
    ("op_label", "op_python", "op_js", "op_suffix"): ELEMENT_OPERATIONS,
    ("cmp_word", "cmp_op"): COMPARISONS,
    ("unit_from", "unit_to", "unit_factor"): UNIT_CONVERSIONS,
    ("stat_label", "stat_name", "stat_body"): PYTHON_STATISTICS,
    ("js_label", "js_name", "js_body"): JS_REDUCTIONS,
    ("cpp_label", "cpp_name", "cpp_body", "cpp_header"): CPP_REDUCTIONS,
    ("sql_table", "sql_number", "sql_group", "sql_label"): SQL_TABLES,
}
SINGLE_SLOTS = {
    "sentence": SENTENCES,
    "word": WORDS,
    "char": "aeiourstn",
    "prop": OBJECT_PROPERTIES,
    "url": URLS,
    "element_id": ELEMENT_IDS,
    "message": ALERT_MESSAGES,
    "csv_file": CSV_FILES,
    "csv_column": CSV_COLUMNS,
    "text_file": TEXT_FILES,
    "directory": DIRECTORIES,
    "size_mb": (1, 5, 10, 50, 100, 500),
    "limit": (15, 20, 30, 50, 100, 200, 500),
}


def draw_slots(rng: random.Random) -> dict[str, object]:
    """Draw one value for every template slot."""
    slots: dict[str, object] = {}
    for names, pool in SLOT_GROUPS.items():
        slots.update(zip(names, rng.choice(pool), strict=True))
    for name, pool in SINGLE_SLOTS.items():
        slots[name] = rng.choice(pool)
    class_name, all_attributes = rng.choice(CLASS_SPECS)
    class_attributes = all_attributes[: rng.randint(2, 3)]
    shape, shape_members, shape_area = rng.choice(CPP_SHAPES)
    ext, other_ext = rng.sample(FILE_EXTENSIONS, 2)
    fizz, buzz = rng.sample(range(2, 10), 2)
    threshold, count = rng.randint(1, 50), rng.randint(5, 30)
    slots.update(
        numbers=random_numbers(rng),
        numbers_with_repeats=[rng.randint(1, 6) for _ in range(rng.randint(5, 8))],
        cpp_numbers="{" + ", ".join(str(n) for n in random_numbers(rng)) + "}",
        op_camel="".join(part.capitalize() for part in str(slots["op_suffix"]).split("_")),
        cmp_name=str(slots["cmp_word"]).replace(" ", "_"),
        threshold=threshold,
        threshold_minus_one=threshold - 1,
        threshold_plus_five=threshold + 5,
        count=count,
        count_plus_one=count + 1,
        limit_plus_one=int(slots["limit"]) + 1,
        divisor=rng.randint(2, 13),
        top=rng.randint(2, 5),
        top_limit=rng.randint(3, 20),
        amount=rng.randint(1, 500),
        row_id=rng.randint(1, 999),
        sql_threshold=rng.randint(1, 100) * rng.choice((1, 10, 100)),
        unit_to_title=str(slots["unit_to"]).capitalize(),
        prop_title=str(slots["prop"]).capitalize(),
        class_name=class_name,
        class_attributes=", ".join(class_attributes),
        class_code=python_class_code(class_name, class_attributes),
        class_table=class_name.lower() + "s",
        class_columns=", ".join(f"{attribute} TEXT" for attribute in class_attributes),
        shape=shape,
        shape_code=cpp_shape_code(shape, shape_members, shape_area),
        ext=ext,
        other_ext=other_ext,
        backup_name=str(slots["directory"]).strip("./~").replace("/", "_"),
        fizz=fizz,
        buzz=buzz,
        fizz_buzz=fizz * buzz,
    )
    return slots


def generate(seed: int) -> list[dict]:
    """Return seeded, unique code instruction records."""
    rng = random.Random(seed)
    records: list[dict] = []
    seen: set[tuple[str, str, str]] = set()
    attempts = 0
    while len(records) < TARGET_RECORDS and attempts < TARGET_RECORDS * 100:
        attempts += 1
        instruction_template, input_template, response_template, input_optional = rng.choice(TEMPLATES)
        slots = draw_slots(rng)
        keep_input = not input_optional or rng.random() < KEEP_OPTIONAL_INPUT_SHARE
        record = {
            "instruction": instruction_template.format(**slots),
            "input": input_template.format(**slots) if keep_input else "",
            "response": response_template.format(**slots),
        }
        key = (record["instruction"], record["input"], record["response"])
        if key in seen or len(record["response"]) > MAX_RESPONSE_CHARS:
            continue
        seen.add(key)
        records.append(record)
    return records
