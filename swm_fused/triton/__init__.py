def unavailable_reason() -> str:
    return "not implemented yet"
