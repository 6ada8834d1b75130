"""State the workers share through Redis and SQL: the rate limiter, the quota ledger, the pause
signal, the answer journal and sent marks, claim heartbeats, content claims, the Redis
connection, and waiting out the infrastructure."""
