-- The hosts an agent secret may be sent to by the egress proxy (a JSON array of host patterns,
-- set by the admin who sets the secret; none: the proxy never sends it).
ALTER TABLE secrets ADD COLUMN hosts TEXT NOT NULL DEFAULT '[]';
