"""Who may do what: principals, roles, account scopes (design notes, section 5)."""
