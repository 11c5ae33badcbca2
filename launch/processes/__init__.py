"""Processes and failure: start-up for every launcher (entry), the process group (dist), rendezvous, lifeline, stops, hangs, fault injection."""
