"""The one injection engine every method uses: target matching, wrapping, freezing, merging."""
