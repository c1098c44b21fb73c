"""The SMTP protocols: the inbound ESMTP server and its parts."""
