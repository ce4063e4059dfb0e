"""Records: their layout (`layout`, the one owner of every path and file name), safe reading and
writing (`store`) and the content-addressed cache of derived resources (`resources`)."""
