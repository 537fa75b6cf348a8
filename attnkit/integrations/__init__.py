"""attnkit inside other libraries' attention hooks. Each integration is its own module, imported
only by those who use it, so attnkit never depends on the library it integrates with."""
